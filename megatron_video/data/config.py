"""All data-pipeline settings in one plain, nested dataclass (loaded from `--data-config` JSON/YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (3, 4), (4, 3), (9, 16), (16, 9))


@dataclass
class ShapeConfig:
    """How every sample's target T x H x W is chosen (from metadata only)."""

    # "forced": every sample is resized/cropped to (height, width); "minmax": Min-Max token buckets.
    resolution_mode: Literal["forced", "minmax"] = "minmax"
    height: int = 288
    width: int = 512
    # Min-Max token strategy; "tokens" are pixels h*w as in the reference (max_hxw / min_hxw).
    max_tokens: int = 65536
    # Samples whose (cropped) source area is below this are dropped; None = smallest bucket area.
    min_tokens: int | None = None
    aspect_ratios: list[tuple[int, int]] = field(default_factory=lambda: [tuple(r) for r in ASPECT_RATIOS])
    spatial_stride: int = 16  # VAE 8 x patch 2
    fps: float = 24.0
    num_frames: int = 121
    min_num_frames: int = 29
    frame_stride: int = 8  # frame counts are snapped down to frame_stride * n + 1 (VAE temporal factor)
    # Optional temporal buckets: a video's frame count is snapped down to the largest bucket it reaches.
    temporal_buckets: list[int] | None = None
    # Whether images (T=1) are part of this data set (image stages) or dropped (video-only stages).
    use_images: bool = True
    use_videos: bool = True


@dataclass
class CaptionConfig:
    cfg_dropout: float = 0.1
    clean: bool = True
    add_aesthetic_phrase: bool = False
    add_motion_phrase: bool = False
    add_camera_phrase: bool = False
    max_length_t5: int = 512
    max_length_clip: int = 77


@dataclass
class BatchConfig:
    global_batch_size: int = 8
    micro_batch_size: int = 1
    # A bucket (shape) is dropped unless it fills at least this many global batches (references use 4).
    min_bucket_batches: int = 1
    # True: the remainder of each bucket that does not fill a global batch is dropped every epoch (reshuffled
    # so different samples are left out each epoch). False: it is completed by repeating bucket members.
    drop_last: bool = True


@dataclass
class EvalDataConfig:
    """The held-out set for the evaluation loss (Open-Sora 1.3 style). Off while `metadata_paths` is empty.

    Shapes follow the training `shape` section; captions are never dropped; the order of samples and the
    noise are fixed by `seed`, so every evaluation (and every parallel layout) sees the same examples."""

    metadata_paths: list[str] = field(default_factory=list)
    data_root: str = ""
    cache_path: str | None = None  # feature cache of the held-out set (built like the training cache)
    num_timesteps: int = 10  # equidistant noise levels i / (n + 1), i = 1..n
    seed: int = 4321

    @property
    def enabled(self) -> bool:
        return bool(self.metadata_paths)


@dataclass
class DataConfig:
    # Open-Sora Plan `data.txt` files (lines `root,annotation.json`) or Parquet files.
    metadata_paths: list[str] = field(default_factory=list)
    # Root prepended to relative paths of Parquet metadata (the text form carries its own roots).
    data_root: str = ""
    shape: ShapeConfig = field(default_factory=ShapeConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    cache_path: str | None = None  # feature cache directory (latents / text embeddings); None = encode online
    max_bad_samples: int = 100  # per data-parallel rank; beyond it the job stops with an error
    video_backend: str = "auto"  # "auto" (decord when installed, else PyAV), "pyav" or "decord"
    num_workers: int = 2
    seed: int = 1234
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)

    def validate(self) -> DataConfig:
        """Raise ValueError naming the first offending field; returns self for chaining."""
        s, c, b = self.shape, self.caption, self.batch
        checks: list[tuple[bool, str]] = [
            (s.resolution_mode in ("forced", "minmax"), "shape.resolution_mode must be 'forced' or 'minmax'"),
            (s.spatial_stride > 0, "shape.spatial_stride must be > 0"),
            (s.resolution_mode != "forced" or (s.height > 0 and s.height % s.spatial_stride == 0),
             "shape.height must be a positive multiple of shape.spatial_stride"),
            (s.resolution_mode != "forced" or (s.width > 0 and s.width % s.spatial_stride == 0),
             "shape.width must be a positive multiple of shape.spatial_stride"),
            (s.max_tokens >= s.spatial_stride ** 2, "shape.max_tokens must be >= spatial_stride**2"),
            (s.min_tokens is None or 0 <= s.min_tokens <= s.max_tokens, "shape.min_tokens must be in "
             "[0, max_tokens]"),
            (len(s.aspect_ratios) > 0 and all(len(r) == 2 and r[0] > 0 and r[1] > 0 for r in s.aspect_ratios),
             "shape.aspect_ratios must be a non-empty list of positive (h, w) pairs"),
            (s.fps > 0, "shape.fps must be > 0"),
            (s.frame_stride >= 1, "shape.frame_stride must be >= 1"),
            (s.num_frames >= 1 and (s.num_frames - 1) % s.frame_stride == 0,
             "shape.num_frames must be frame_stride * n + 1"),
            (1 <= s.min_num_frames <= s.num_frames, "shape.min_num_frames must be in [1, num_frames]"),
            (s.temporal_buckets is None or (len(s.temporal_buckets) > 0 and all(
                1 <= t <= s.num_frames and (t - 1) % s.frame_stride == 0 for t in s.temporal_buckets)),
             "shape.temporal_buckets must be frame_stride * n + 1 values in [1, num_frames]"),
            (s.use_images or s.use_videos, "shape.use_images/use_videos: at least one must be true"),
            (0.0 <= c.cfg_dropout <= 1.0, "caption.cfg_dropout must be in [0, 1]"),
            (c.max_length_t5 > 0, "caption.max_length_t5 must be > 0"),
            (c.max_length_clip > 0, "caption.max_length_clip must be > 0"),
            (b.micro_batch_size >= 1, "batch.micro_batch_size must be >= 1"),
            (b.global_batch_size >= b.micro_batch_size and b.global_batch_size % b.micro_batch_size == 0,
             "batch.global_batch_size must be a positive multiple of batch.micro_batch_size"),
            (b.min_bucket_batches >= 1, "batch.min_bucket_batches must be >= 1"),
            (self.max_bad_samples >= 0, "max_bad_samples must be >= 0"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.video_backend in ("auto", "pyav", "decord"), "video_backend must be auto, pyav or decord"),
            (self.eval.num_timesteps >= 1, "eval.num_timesteps must be >= 1"),
            (self.eval.cache_path is None or self.eval.enabled,
             "eval.cache_path needs eval.metadata_paths (the held-out set's metadata)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"DataConfig: {msg}")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        """Build from a (nested) dict such as a parsed JSON/YAML file; unknown keys are an error."""
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


def _build(klass: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"DataConfig: {prefix.rstrip('.') or 'config'} must be a mapping")
    known = {f.name: f for f in fields(klass)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"DataConfig: unknown field(s) {', '.join(prefix + u for u in unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.")
        elif name == "aspect_ratios":
            kwargs[name] = [tuple(int(v) for v in r) for r in value]
        else:
            kwargs[name] = value
    return klass(**kwargs)


def _to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_dict(v) for v in obj]
    return obj
