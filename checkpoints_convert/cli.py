"""Command line: `python -m checkpoints_convert {import,export,reshard} ...` (see --help of each)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from checkpoints_convert.convert import (
    config_mismatch,
    export_checkpoint,
    import_released,
    open_checkpoint,
    reshard_legacy,
)
from checkpoints_convert.layout import LayoutError
from checkpoints_convert.mindspeed import FLAVOURS, UpstreamLegacyReader
from checkpoints_convert.ours import CheckpointFormatError, LegacyReader
from checkpoints_convert.schema import SchemaError, config_from_diffusers
from checkpoints_convert.sources import SourceError, open_released
from megatron_video.models.suv_mmdit.config import PRESETS, SUVConfig

ERRORS = (SchemaError, LayoutError, SourceError, CheckpointFormatError, ValueError, FileNotFoundError)

DESCRIPTION = """Convert Open-Sora Plan v1.5 SUV weights between the released format and our checkpoints.

Our checkpoints come in two formats:
  dist    megatron dist_checkpointing (what pretrain_t2v.py saves and --load reads). Tensors are stored in
          global shapes, so a dist checkpoint loads at ANY TP x PP x CP layout and never needs resharding.
  legacy  Megatron per-rank files iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt (MindSpeed-MM and the
          Open-Sora Plan fork), released key names, TP slices per the released split rules, blocks split
          contiguously over pipeline stages (earlier stages take the extra blocks).
"""

def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)

def _add_config(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--model-config", help="model config file (as pretrain_t2v.py --model-config)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a model preset (default: the config stored with "
                   "the weights, else osp-v1.5-8.5b)")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="released weights (.pt / .safetensors / diffusers folder) -> our checkpoint")
    imp.add_argument("source", help="released .pt, .safetensors, or a folder with config.json + safetensors")
    imp.add_argument("output", help="checkpoint root to write (iter_XXXXXXX/ + latest_checkpointed_iteration.txt)")
    imp.add_argument("--format", choices=("dist", "legacy"), default="dist")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size (legacy only)")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (legacy only)")
    imp.add_argument("--iteration", type=int, default=0)
    imp.add_argument("--prefix", default="", help="only keys with this prefix, stripped (e.g. 'state_dict.')")
    imp.add_argument("--nest", default=None, help="entry of a .pt object holding the state dict (e.g. 'model')")
    imp.add_argument("--last-block-text", choices=("auto", "keep", "drop"), default="auto",
                     help="the last block's text output modules (released TP=8 weights carry them; they never "
                          "affect the output): keep as found (auto), require (keep) or drop them")
    imp.add_argument("--from", dest="source_format", choices=("released",) + FLAVOURS, default="released",
                     help="what the source is: released weights (default), or a training checkpoint of "
                          "MindSpeed-MM or of the Open-Sora Plan fork (its root, iter_XXXXXXX/ or release/ "
                          "folder: mp_rank_TT[_PPP]/model_optim_rng.pt at any TP)")
    imp.add_argument("--weights", choices=("model", "ema"), default="model",
                     help="--from osp-fork: the model or the EMA ('ema_model') weights")
    _add_config(imp)
    imp.add_argument("--mm-model", help="the model config as an upstream model JSON (MindSpeed-MM / fork "
                     "--mm-model file; its 'predictor' section)")

    exp = sub.add_parser("export", help="our checkpoint (dist or legacy; model or EMA) -> released files")
    exp.add_argument("checkpoint", help="checkpoint root or an iter_XXXXXXX directory")
    exp.add_argument("--iteration", type=int, default=None)
    exp.add_argument("--weights", choices=("model", "ema"), default="model")
    exp.add_argument("--safetensors", help="write one released state dict as safetensors")
    exp.add_argument("--pt", help="write one released state dict as a torch .pt")
    exp.add_argument("--diffusers", help="write a diffusers-style folder (config.json + safetensors)")
    exp.add_argument("--max-shard-size", type=_size, default=_size("10GB"),
                     help="diffusers folder: shard above this size (e.g. 5GB; default 10GB)")
    exp.add_argument("--last-block-text", choices=("auto", "include", "omit"), default="auto",
                     help="include: as the released file (zeros if the checkpoint lacks them)")
    exp.add_argument("--no-extra-state", action="store_true", help="leave the None ._extra_state entries out "
                     "of the .pt (the released file has 449 of them)")
    _add_config(exp)

    res = sub.add_parser("reshard", help="legacy checkpoint TP x PP -> another TP x PP (dist needs none)")
    res.add_argument("checkpoint", help="legacy checkpoint root or iter_XXXXXXX directory")
    res.add_argument("output")
    res.add_argument("--tp", type=int, required=True)
    res.add_argument("--pp", type=int, default=1)
    res.add_argument("--iteration", type=int, default=None)
    _add_config(res)
    return parser

def resolve_config(args: argparse.Namespace, stored: SUVConfig | None) -> SUVConfig:
    """--model-config / --preset if given (checked against a config stored with the weights), else the stored
    one, else the released 8.5B."""
    given = None
    if args.model_config:
        from megatron_video.configfile import ConfigError, read_mapping
        from megatron_video.models.registry import model_config_from_mapping

        try:
            given = model_config_from_mapping(read_mapping(args.model_config), source=args.model_config)
        except ConfigError as exc:
            raise SchemaError(str(exc)) from exc
    elif args.preset:
        given = PRESETS[args.preset]
    if given is not None and stored is not None:
        diff = config_mismatch(given, stored)
        if diff:
            raise SchemaError(f"the given model config does not match the one stored with the weights: {diff[:4]}")
    return given or stored or PRESETS["osp-v1.5-8.5b"]

def _stored_config(data: dict[str, Any] | None, diffusers: bool) -> SUVConfig | None:
    if data is None:
        return None
    try:
        return config_from_diffusers(data) if diffusers else SUVConfig(**data)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"the config stored with the weights is not a valid SUV config: {exc}") from exc

def run(args: argparse.Namespace) -> str:
    start = time.perf_counter()
    if args.command == "import":
        notes: list[str] = []
        if args.source_format == "released":
            source = open_released(args.source, args.prefix, args.nest)
            stored = _stored_config(source.config, diffusers=True)
        else:
            source = UpstreamLegacyReader(args.source, args.source_format, args.weights)
            stored = None
        if args.mm_model:
            stored = _mm_model_config(args.mm_model, notes)
        cfg = resolve_config(args, stored)
        out = import_released(source, args.output, cfg, args.format, args.tp, args.pp, args.iteration,
                              args.last_block_text)
        detail = f"{args.format} checkpoint" + (f" TP={args.tp} PP={args.pp}" if args.format == "legacy" else "")
        for key, diff in sorted(getattr(source, "drift", {}).items()):
            notes.append(f"note: {key} differs between TP ranks (max |diff| {diff:.3g}); TP rank 0's value taken")
        for note in notes:
            print(note, file=sys.stderr)
    elif args.command == "export":
        stored = _legacy_config(args.checkpoint, args.iteration)
        cfg = resolve_config(args, stored)
        reader, directory, fmt = open_checkpoint(args.checkpoint, cfg, args.iteration, args.weights)
        paths = export_checkpoint(reader, cfg, f"{directory} ({fmt}, {args.weights})", args.safetensors, args.pt,
                                  args.diffusers, args.last_block_text, not args.no_extra_state,
                                  args.max_shard_size)
        out, detail = ", ".join(str(p) for p in paths), f"released {args.weights} weights"
    else:
        stored = _legacy_config(args.checkpoint, args.iteration)
        cfg = resolve_config(args, stored)
        out = reshard_legacy(args.checkpoint, args.output, cfg, args.tp, args.pp, args.iteration)
        detail = f"legacy checkpoint TP={args.tp} PP={args.pp}"
    return f"{args.command}: wrote {detail} to {out} in {time.perf_counter() - start:.1f} s"

def _mm_model_config(path: str, notes: list[str]) -> SUVConfig:
    """The SUV config of an upstream model JSON's 'predictor' section."""
    import json

    from megatron_video.models.suv_mmdit.upstream import config_from_predictor

    try:
        predictor = json.loads(Path(path).read_text())["predictor"]
        cfg, dropped = config_from_predictor(predictor)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SchemaError(f"--mm-model {path}: not an upstream model JSON with a 'predictor' section ({exc})") \
            from exc
    notes.extend(f"note: --mm-model predictor.{k} not used: {why}" for k, why in dropped.items())
    return cfg


def _legacy_config(path: str, iteration: int | None) -> SUVConfig | None:
    from checkpoints_convert.ours import detect_format, resolve_iteration

    directory = resolve_iteration(path, iteration)
    if detect_format(directory) != "legacy":
        return None
    return _stored_config(LegacyReader(directory).stored_config, diffusers=False)

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

__all__ = ["build_parser", "main", "resolve_config", "run"]

if __name__ == "__main__":
    sys.exit(main())

