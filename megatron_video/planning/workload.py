"""What one training step processes: the video shape in pixels -> latent grid -> tokens, and parameter counts.

Counts follow the module structure of `models/suv_mmdit/model.py` exactly (the test checks them against a
built model), split into tensor-parallel-sharded and replicated parts so per-rank sizes are exact under TP.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_video.models.suv_mmdit.config import BlockSpec, SUVConfig


@dataclass(frozen=True)
class VideoShape:
    """A training sample in pixels (frames x height x width) plus the text length, and the VAE compression."""

    frames: int
    height: int
    width: int
    text_tokens: int = 512  # T5 max length as trained
    vae_temporal: int = 8
    vae_spatial: int = 8

    def __post_init__(self) -> None:
        if self.frames < 1 or (self.frames - 1) % self.vae_temporal != 0:
            raise ValueError(f"frames must be {self.vae_temporal}n + 1 for the causal VAE, got {self.frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 1 or value % self.vae_spatial != 0:
                raise ValueError(f"{name} must be a positive multiple of {self.vae_spatial}, got {value}")
        if self.text_tokens < 1:
            raise ValueError(f"text_tokens must be >= 1, got {self.text_tokens}")

    @classmethod
    def parse(cls, text: str, text_tokens: int = 512) -> VideoShape:
        """'121x576x1024' (frames x height x width)."""
        parts = text.lower().replace("×", "x").split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"video shape must look like 121x576x1024 (frames x height x width), got {text!r}")
        f, h, w = (int(p) for p in parts)
        return cls(f, h, w, text_tokens=text_tokens)

    def latent_thw(self) -> tuple[int, int, int]:
        return ((self.frames - 1) // self.vae_temporal + 1, self.height // self.vae_spatial,
                self.width // self.vae_spatial)

    def video_tokens(self, patch: int = 2) -> int:
        t, h, w = self.latent_thw()
        if h % patch or w % patch:
            raise ValueError(f"latent {h}x{w} is not divisible by the patch size {patch}")
        return t * (h // patch) * (w // patch)

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class ParamCount:
    """Parameters split over TP (divided by the TP size on each rank) and replicated on every TP rank."""

    split: int
    replicated: int

    @property
    def total(self) -> int:
        return self.split + self.replicated

    def per_rank(self, tp: int) -> float:
        return self.split / tp + self.replicated

    def __add__(self, other: ParamCount) -> ParamCount:
        return ParamCount(self.split + other.split, self.replicated + other.replicated)


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def block_params(cfg: SUVConfig, spec: BlockSpec) -> ParamCount:
    h, e, f, d = cfg.hidden_size, cfg.timestep_embed_dim, cfg.ffn_hidden_size, cfg.head_dim
    text_out = not spec.context_pre_only or cfg.build_last_block_text_modules
    split = 6 * _linear(h, h)  # q/k/v of both streams (column: weight and bias split)
    split += (1 + text_out) * h * h  # output projections (row: weight split, bias replicated)
    replicated = (1 + text_out) * h
    replicated += 4 * d  # per-head qk RMSNorm weights, two streams
    split += 2 * _linear(e, 6 * h)  # the two modulations
    replicated += (3 + text_out) * 2 * h  # LayerNorms (weight + bias)
    split += (1 + text_out) * 2 * h * f  # feed-forwards, no bias
    if spec.skip_in is not None:
        replicated += 2 * _linear(2 * h, h)  # long-skip linears, video and text
    return ParamCount(split, replicated)


def embed_params(cfg: SUVConfig) -> ParamCount:
    h, e, p = cfg.hidden_size, cfg.timestep_embed_dim, cfg.patch_size
    replicated = cfg.in_channels * h * p * p + h  # patch conv
    replicated += cfg.condition_channels * h * p * p  # inpainting conditioning conv, no bias
    replicated += 2 * _linear(e, e) + _linear(cfg.pooled_projection_dim, e) + _linear(e, e)  # time + pooled text
    replicated += _linear(cfg.caption_channels, h)
    return ParamCount(0, replicated)


def final_params(cfg: SUVConfig) -> ParamCount:
    h = cfg.hidden_size
    return ParamCount(_linear(cfg.timestep_embed_dim, 2 * h), 4 * h + _linear(h, cfg.patch_out_features))


def model_params(cfg: SUVConfig) -> ParamCount:
    total = embed_params(cfg) + final_params(cfg)
    for spec in cfg.block_specs():
        total = total + block_params(cfg, spec)
    return total


def pipeline_split(num_blocks: int, pp: int) -> list[int]:
    """Blocks per pipeline stage: as even as possible, earlier stages take the remainder."""
    if pp < 1 or pp > num_blocks:
        raise ValueError(f"pipeline size {pp} must be in [1, {num_blocks}] (the number of blocks)")
    base, extra = divmod(num_blocks, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def stage_params(cfg: SUVConfig, pp: int) -> list[ParamCount]:
    """Parameters held by each pipeline stage (embeddings on the first, final layer on the last)."""
    specs = cfg.block_specs()
    out: list[ParamCount] = []
    start = 0
    for i, n in enumerate(pipeline_split(len(specs), pp)):
        count = ParamCount(0, 0)
        for spec in specs[start:start + n]:
            count = count + block_params(cfg, spec)
        if i == 0:
            count = count + embed_params(cfg)
        if i == pp - 1:
            count = count + final_params(cfg)
        out.append(count)
        start += n
    return out


def skips_crossing(cfg: SUVConfig, pp: int) -> list[int]:
    """For each of the pp - 1 stage boundaries, how many long-skip tensor pairs (video, text) must travel
    across it besides the main streams (U-shape pairs whose producer and consumer sit on different sides)."""
    specs = cfg.block_specs()
    split = pipeline_split(len(specs), pp)
    bounds = [sum(split[:i + 1]) for i in range(pp - 1)]  # first block index of the next stage
    producers = [s.index for s in specs if s.skip_out]
    consumers = [s.index for s in specs if s.skip_in is not None][::-1]  # LIFO: last consumer pairs first
    pairs = list(zip(producers, consumers))
    return [sum(1 for a, b in pairs if a < bound <= b) for bound in bounds]


__all__ = [
    "ParamCount", "VideoShape", "block_params", "embed_params", "final_params", "model_params", "pipeline_split",
    "skips_crossing", "stage_params",
]
