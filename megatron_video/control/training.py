"""pretrain_control.py's pieces around the shared training loop: flags, pre-flight checks, the frozen base with
its trainable structure controller (`wrap`), the structure signal of every micro-batch (`setup`) and the
denoiser inputs (`control_inputs`).

The base is loaded once at start-up from `--base` (one of our checkpoints, model or EMA weights, or released
weights) and never saved again: the controller's checkpoints hold only the controller (`controller.*`), its
optimizer state and EMA, plus a record of the base (resolved path and a content fingerprint), its own
architecture and the signal kind under `common["control"]`. Resuming (`--load`) refuses a `--base` whose
fingerprint differs from the record, before anything heavy is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_video.control.signals import (
    SIGNAL_KINDS,
    add_signal_source_args,
    check_signal_source,
    from_levels,
    signal_extractor,
)

CONTROL_RECORD = "control"  # the key of the controller's record in every checkpoint's common state
_ITER_DIR = re.compile(r"^iter_\d{7}$")


def add_control_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("structure controller (pretrain_control.py)")
    g.add_argument("--base", type=str, required=True,
                   help="the frozen base denoiser: one of our checkpoint directories (its latest iteration, or an "
                        "iter_XXXXXXX directory) or released weights (.safetensors, .pt or a diffusers folder)")
    g.add_argument("--base-weights", choices=("model", "ema"), default="ema",
                   help="which weights of a --base checkpoint of ours")
    g.add_argument("--structure-signal", choices=SIGNAL_KINDS, required=True,
                   help="the structure signal the controller learns: canny edges, depth (MiDaS) or sketch (PiDiNet)")
    add_signal_source_args(g)  # online signals only: a feature cache holds them computed
    g.add_argument("--control-blocks", type=int, default=2, help="K: transformer blocks of the controller's encoder")
    g.add_argument("--control-conv-channels", type=int, default=32, help="channels of the encoder's convolutions")
    g.add_argument("--control-hidden-size", type=int, default=None,
                   help="width of the encoder's transformer blocks (default: the base's hidden size); a multiple of "
                        "the base's head size: fewer heads, its projectors map back to the base's width")
    g.add_argument("--control-temporal-downsample", type=int, default=4,
                   help="pixel frames per latent frame of the video VAE (WF-VAE: 4)")
    g.add_argument("--control-spatial-downsample", type=int, default=8,
                   help="pixels per latent pixel of the video VAE (WF-VAE: 8)")


def control_config(args: argparse.Namespace) -> Any:
    """The ControlConfig the --control-* flags describe (imported here: --help must not import megatron)."""
    from megatron_video.models.control import ControlConfig

    return ControlConfig(signal_channels=1, temporal_downsample=args.control_temporal_downsample,
                         spatial_downsample=args.control_spatial_downsample,
                         conv_channels=args.control_conv_channels, num_blocks=args.control_blocks,
                         hidden_size=args.control_hidden_size)


# ---------------------------------------------------------------------------------------------- the base


@dataclass(frozen=True)
class BaseSource:
    path: Path  # released weights, or the iter_XXXXXXX directory of our checkpoint
    ours: bool
    weights: str  # "model" / "ema" (ours only)


def base_source(path: str, weights: str) -> BaseSource:
    """Where `--base` points; ValueError for a path that is neither kind."""
    from megatron_video.training.checkpointing import TRACKER, iteration_dir, latest_iteration

    base = Path(path)
    if not base.exists():
        raise ValueError(f"--base {path}: not found")
    if base.is_dir() and _ITER_DIR.match(base.name):
        return BaseSource(base.resolve(), True, weights)
    if base.is_dir() and (base / TRACKER).is_file():
        return BaseSource(iteration_dir(base, latest_iteration(base)).resolve(), True, weights)
    return BaseSource(base.resolve(), False, weights)


@functools.lru_cache(maxsize=4)
def fingerprint(path: Path) -> str:
    """sha256 over every file under `path` (relative name, size and bytes, in name order): the base's identity,
    independent of where it is stored and of the layout it is loaded at. Reads the base once (computed once per
    process)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def base_shapes(source: BaseSource, cfg: Any) -> dict[str, tuple[int, ...] | None]:
    """Released key -> global shape of the base's tensors, from metadata only."""
    if not source.ours:
        from checkpoints_convert.sources import SourceError, open_released

        try:
            return open_released(str(source.path)).shapes()
        except SourceError as exc:
            raise ValueError(f"--base: {exc}") from exc
    from megatron.core.dist_checkpointing import load_tensors_metadata

    from megatron_video.models.suv_mmdit.state_dict_adapter import to_released_key
    from megatron_video.training.checkpoint_safety import CheckpointRefused, verify_dist_checkpoint

    try:
        verify_dist_checkpoint(source.path)  # before its metadata is unpickled
    except CheckpointRefused as exc:
        raise ValueError(f"--base: {exc}") from exc
    prefix = source.weights + "."
    shapes: dict[str, tuple[int, ...] | None] = {}
    for key, meta in load_tensors_metadata(str(source.path)).items():
        if not key.startswith(prefix) or not hasattr(meta, "global_shape"):
            continue
        try:
            shapes[to_released_key(key[len(prefix):], cfg)] = tuple(meta.global_shape)
        except KeyError as exc:
            raise ValueError(f"--base {source.path} is not a checkpoint of the --model-config denoiser: {exc}") from exc
    if not shapes:
        raise ValueError(f"--base {source.path} holds no {source.weights} weights (--base-weights model|ema)")
    return shapes


def check_base(source: BaseSource, cfg: Any) -> None:
    from checkpoints_convert.schema import SchemaError, check_schema

    if cfg.condition_channels:
        raise ValueError("the structure controller trains on a text-to-video base: the model config has "
                         f"condition_channels {cfg.condition_channels} (an inpainting model)")
    try:
        check_schema(base_shapes(source, cfg), cfg, f"--base {source.path}")
    except SchemaError as exc:
        raise ValueError(str(exc)) from exc


def control_record(args: argparse.Namespace) -> dict[str, Any]:
    """What every controller checkpoint records (plain values: read back with weights_only)."""
    source = base_source(args.base, args.base_weights)
    return {"base": str(source.path), "base_weights": source.weights if source.ours else "released",
            "base_fingerprint": fingerprint(source.path), "signal": args.structure_signal,
            "config": dataclasses.asdict(control_config(args))}


def saved_record(load: str) -> dict[str, Any] | None:
    """The control record of the checkpoint `--load` resumes from (None when it has none)."""
    from megatron_video.training.checkpoint_safety import COMMON_FILE
    from megatron_video.training.checkpointing import iteration_dir, latest_iteration

    common = torch.load(iteration_dir(load, latest_iteration(load)) / COMMON_FILE, map_location="cpu",
                        weights_only=True)  # checked to hold data only by the pre-flight's safety check
    return (common.get("common") or {}).get(CONTROL_RECORD)


def check_resume(args: argparse.Namespace) -> None:
    """A `--load` to resume must be a controller checkpoint of this base, signal and controller architecture."""
    from megatron_video.training.save_dir import resume_iteration

    if args.load is None or resume_iteration(args.load) is None:
        return
    saved = saved_record(args.load)
    if saved is None:
        raise ValueError(f"--load {args.load} is not a structure-controller checkpoint (no control record): "
                         "pretrain_control.py resumes its own checkpoints; give a base model with --base")
    current = control_record(args)
    if saved["base_fingerprint"] != current["base_fingerprint"]:
        raise ValueError(f"--base {current['base']} (fingerprint {current['base_fingerprint'][:12]}) is not the base "
                         f"--load {args.load} was trained on ({saved['base']}, fingerprint "
                         f"{saved['base_fingerprint'][:12]}): resume with that base")
    from megatron_video.models.control import ControlConfig

    saved = {**saved, "config": {**dataclasses.asdict(ControlConfig()), **saved["config"]}}  # fields added later
    for key, flag in (("signal", "--structure-signal"), ("config", "the --control-* flags")):
        if saved[key] != current[key]:
            raise ValueError(f"--load {args.load} was trained with {key} {saved[key]}, {flag} give {current[key]}")


def check_control_args(args: argparse.Namespace) -> None:
    """training/preflight.py's checks for pretrain_control.py (ValueError naming the problem), all before any
    process group or model: base path, kind and fit with --model-config; the signal's source; the data; resume."""
    source = base_source(args.base, args.base_weights)
    if args.model_config is not None:
        check_base(source, args.model_config)  # a checkpoint of ours is first checked to hold data only
    try:
        control = control_config(args)
        if args.model_config is not None:
            control.width(args.model_config, args.tensor_model_parallel_size)
    except ValueError as exc:
        raise ValueError(f"--control-*: {exc}") from exc
    data = args.data_config
    cache = getattr(data, "cache_path", None) if data is not None else None
    if cache:
        meta_path = Path(cache) / "meta.json"
        stored = json.loads(meta_path.read_text()).get("structure") if meta_path.is_file() else None
        if stored != args.structure_signal:
            raise ValueError(f"--data-config: the feature cache {cache} holds {stored or 'no'} structure signal, "
                             f"--structure-signal is {args.structure_signal}: rebuild it with tools/cache_features.py "
                             f"--structure {args.structure_signal}, or train on decoded videos (no cache_path)")
    elif data is not None:
        if not args.vae_path:
            raise ValueError("online structure signals train on decoded videos: give --vae-path (and --vae-config), "
                             "or a feature cache built with tools/cache_features.py --structure KIND")
        check_signal_source(args.structure_signal, args.structure_model, args.structure_sketch_arch)
    check_resume(args)


# ------------------------------------------------------------------------------------------- the hooks


def load_base(source: BaseSource, denoiser: torch.nn.Module) -> None:
    """The base's weights into this rank's denoiser (its TP slices and pipeline stage). The RNG state is kept:
    loading a training checkpoint would otherwise restore the base run's."""
    from megatron_video.training.checkpointing import (
        load_checkpoint,
        model_sharded_state_dict,
        rng_state,
        set_rng_state,
    )

    state = rng_state()
    if source.ours:
        prefix = source.weights + "."
        iteration = int(source.path.name.removeprefix("iter_"))
        _, loaded, _ = load_checkpoint(source.path.parent, lambda: {
            "weights": model_sharded_state_dict(denoiser, prefix=prefix)}, iteration=iteration)
        denoiser.load_state_dict(loaded["weights"], strict=True)
    else:
        from megatron_video.sampling.cli import load_released_weights

        load_released_weights(str(source.path), denoiser, "--base")
    set_rng_state(state)


def control_wrap(args: argparse.Namespace, denoiser: torch.nn.Module) -> Any:
    """The loop's `wrap` hook: the base loaded and frozen inside a ControlledSUV; only `controller.*` trains and
    is checkpointed."""
    from megatron_video.models.control import ControlledSUV
    from megatron_video.training.components import ModelWrap

    model = ControlledSUV(denoiser, control_config(args))  # the controller drawn before the base is read
    load_base(base_source(args.base, args.base_weights), denoiser)
    return ModelWrap(model, frozen_prefix="base.", common={CONTROL_RECORD: control_record(args)})


def control_setup(args: argparse.Namespace, parts: Any, encoder: Any) -> Any:
    """The loop's `setup` hook: returns the per-micro-batch conditioner that sets "structure", the controller's
    float input, from the feature cache's stored signal or from the decoded video."""
    from megatron_video.parallel.initialize import local_device

    device = local_device()
    extract = None
    if not args.data_config.cache_path:
        if encoder.vae is None:
            raise ValueError("online structure signals need the decoded video: give --vae-path")
        encoder.keep_video = True
        extract = signal_extractor(args.structure_signal, args.structure_model, args.structure_sketch_arch)

    def condition(micro_batch: dict[str, Any], iteration: int, consumed_samples: int) -> None:
        levels = micro_batch.get("structure")  # the feature cache's
        if levels is None:
            levels = extract(micro_batch.pop("video").to(device))
        micro_batch["structure"] = from_levels(levels).to(device)

    return condition


def control_inputs(batch: dict[str, Any], sample: Any) -> dict[str, torch.Tensor]:
    """Denoiser keyword arguments: text-to-video's plus the structure signal."""
    from megatron_video.training.loop import t2v_inputs

    return {**t2v_inputs(batch, sample), "structure": batch["structure"]}


__all__ = ["CONTROL_RECORD", "add_control_args", "base_source", "check_control_args", "control_config",
           "control_inputs", "control_record", "control_setup", "control_wrap", "fingerprint", "load_base",
           "saved_record"]
