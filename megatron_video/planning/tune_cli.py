"""Command line of `tools/tune_parallel.py`: which TP / CP / PP / DP, micro-batch and recompute for a stage."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_video.configfile import read_mapping
from megatron_video.planning.cluster import DEVICE_PRESETS, cluster_from
from megatron_video.planning.cost import DataParallelOverlap, Layout
from megatron_video.planning.memory import GIB, RECOMPUTE_MODES
from megatron_video.planning.planner import Plan, format_plan, launch_env, launch_flags, plan, rank_of
from megatron_video.planning.workload import VideoShape


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(x.strip() for x in text.split(","))
    bad = [m for m in modes if m not in RECOMPUTE_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"recompute modes must be among {RECOMPUTE_MODES}, got {bad}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    g = p.add_argument_group("workload")
    g.add_argument("--model-config", help="JSON/YAML model config (as for pretrain_t2v.py)")
    g.add_argument("--preset", default=None, help="SUV preset name instead of --model-config "
                   "(default osp-v1.5-8.5b)")
    g.add_argument("--shape", help="frames x height x width in pixels, e.g. 121x576x1024")
    g.add_argument("--text-tokens", type=int, default=512)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--stages", help="a stages.yaml table (examples/opensoraplan1.5/stages.yaml)")
    g.add_argument("--stage", help="stage name in --stages: fills --shape, --global-batch-size, --devices")
    g = p.add_argument_group("cluster (a device preset and/or a file, then these overrides)")
    g.add_argument("--cluster-preset", choices=sorted(DEVICE_PRESETS), default=None)
    g.add_argument("--cluster-config", help="JSON/YAML with ClusterSpec fields")
    g.add_argument("--devices", type=int, dest="num_devices")
    g.add_argument("--devices-per-node", type=int)
    g.add_argument("--memory-gib", type=float)
    g.add_argument("--peak-tflops", type=float)
    g.add_argument("--intra-node-gbps", type=float)
    g.add_argument("--inter-node-gbps", type=float)
    g.add_argument("--efficiency", type=float, dest="compute_efficiency")
    g.add_argument("--reserved-gib", type=float)
    g = p.add_argument_group("search")
    g.add_argument("--micro-batch-sizes", type=_int_list, default=(1, 2, 4, 8))
    g.add_argument("--recompute", type=_modes, default=RECOMPUTE_MODES)
    g.add_argument("--max-tp", type=int, default=None, help="default: devices per node")
    g.add_argument("--tp", type=int, help="pin the tensor-parallel size")
    g.add_argument("--cp", type=int, help="pin the context-parallel size")
    g.add_argument("--pp", type=int, help="pin the pipeline-parallel size")
    g.add_argument("--cp-strategy", choices=("skiparse", "ulysses"), default="skiparse")
    g.add_argument("--ema-replicated", action="store_true", help="an unsharded fp32 EMA (as the training fork)")
    # the trainer's data-parallel overlap flags (Megatron-LM's), so the estimate models what the run does
    g.add_argument("--overlap-grad-reduce", action="store_true", help="as the trainer's flag")
    g.add_argument("--overlap-param-gather", action="store_true", help="as the trainer's flag")
    g.add_argument("--ddp-bucket-size", type=int, default=None, help="as the trainer's flag")
    g = p.add_argument_group("output")
    g.add_argument("--top", type=int, default=10)
    g.add_argument("--mark", help="also show this layout's rank: TP,CP,PP,MBS,RECOMPUTE (e.g. 2,1,1,2,selective)")
    g.add_argument("--json", action="store_true", help="print the ranked layouts as JSON")
    return p


def _stage_values(path: str, name: str) -> dict[str, Any]:
    table = read_mapping(path).get("stages", {})
    if name not in table:
        raise SystemExit(f"--stage {name!r} not in {path}; stages: {', '.join(table)}")
    return table[name]


def run(argv: Sequence[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    """Parse, validate, plan. Bad input exits with a message before the search."""
    args = build_parser().parse_args(argv)
    stage: dict[str, Any] = {}
    if args.stage is not None:
        if args.stages is None:
            raise SystemExit("--stage needs --stages FILE")
        stage = _stage_values(args.stages, args.stage)
    shape_text = args.shape or (f"{stage['frames']}x{stage['height']}x{stage['width']}" if stage else None)
    global_batch = args.global_batch_size or stage.get("global_batch")
    if shape_text is None or global_batch is None:
        raise SystemExit("need --shape and --global-batch-size (or --stages and --stage)")
    if args.model_config and args.preset:
        raise SystemExit("give --model-config or --preset, not both")
    if args.model_config:
        from megatron_video.models.registry import model_config_from_mapping

        if not Path(args.model_config).is_file():
            raise SystemExit(f"--model-config: file not found: {args.model_config}")
        cfg = model_config_from_mapping(read_mapping(args.model_config), source=args.model_config)
    else:
        from megatron_video.models.suv_mmdit.config import suv_config

        cfg = suv_config(args.preset or "osp-v1.5-8.5b")
    try:
        shape = VideoShape.parse(shape_text, text_tokens=args.text_tokens)
        overrides = {k: getattr(args, k) for k in ("num_devices", "devices_per_node", "memory_gib", "peak_tflops",
                                                   "intra_node_gbps", "inter_node_gbps", "compute_efficiency",
                                                   "reserved_gib")}
        if overrides["num_devices"] is None and "devices" in stage:
            overrides["num_devices"] = stage["devices"]
        preset = args.cluster_preset if (args.cluster_preset or args.cluster_config) else "ascend-910b-64g"
        cluster = cluster_from(preset, args.cluster_config, **overrides)
        fixed = {k: v for k, v in (("tp", args.tp), ("cp", args.cp), ("pp", args.pp)) if v is not None}
        return plan(cfg, shape, int(global_batch), cluster, micro_batches=args.micro_batch_sizes,
                    recompute=args.recompute, max_tp=args.max_tp, cp_strategy=args.cp_strategy,
                    ema_replicated=args.ema_replicated, fixed=fixed,
                    overlap=DataParallelOverlap(args.overlap_grad_reduce, args.overlap_param_gather,
                                                args.ddp_bucket_size)), args
    except ValueError as exc:
        raise SystemExit(f"tune_parallel: {exc}") from exc


def to_json(result: Plan, top: int) -> str:
    rows = []
    for e in result.ranked[:top]:
        lay = e.layout
        rows.append({
            "tp": lay.tp, "cp": lay.cp, "pp": lay.pp, "dp": lay.dp, "micro_batch": lay.micro_batch,
            "recompute": lay.recompute, "memory_gib": e.memory / GIB, "step_seconds": e.time.total, "mfu": e.mfu,
            "flags": launch_flags(e, result.global_batch, result.cluster.device, result.overlap),
            "env": launch_env(e, result.global_batch),
        })
    return json.dumps({"shape": str(result.shape), "global_batch": result.global_batch, "fits": len(result.ranked),
                       "ranked": rows}, indent=1)


def _marked(text: str | None, result: Plan, cp_strategy: str) -> Layout | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 5 or not all(p.isdigit() for p in parts[:4]) or parts[4] not in RECOMPUTE_MODES:
        raise SystemExit(f"--mark must be TP,CP,PP,MBS,RECOMPUTE (e.g. 2,1,1,2,selective), got {text!r}")
    tp, cp, pp, mbs = (int(p) for p in parts[:4])
    dp = result.cluster.num_devices // (tp * cp * pp)
    return Layout(tp, cp, pp, dp, mbs, parts[4], cp_strategy)


def main(argv: Sequence[str] | None = None) -> int:
    result, args = run(argv)
    mark = _marked(args.mark, result, args.cp_strategy)
    if args.json:
        print(to_json(result, args.top))
    else:
        print(format_plan(result, top=args.top, mark=mark))
        if mark is not None and rank_of(result, mark) is None:
            print(f"marked layout {args.mark}: " + ("does not fit: " + _too_big(result, mark)
                                                    if _too_big(result, mark) else "is not a valid layout here"))
    return 0 if result.ranked else 1


def _too_big(result: Plan, layout: Layout) -> str:
    for e in result.too_big:
        if e.layout == layout:
            return (f"{e.memory / GIB:.1f} GiB (states {e.states.total / GIB:.1f}, activations "
                    f"{e.activations / GIB:.1f}, workspace {e.workspace / GIB:.1f}, reserved {e.reserved / GIB:.1f})")
    return ""


__all__ = ["build_parser", "main", "run", "to_json"]
