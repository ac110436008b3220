"""Enumerate TP x CP x PP x DP x micro-batch x recompute for a model, a video shape, a global batch and a
cluster; keep the layouts that fit in memory; rank them by estimated step time."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_video.models.suv_mmdit.config import SUVConfig
from megatron_video.planning.cluster import ClusterSpec
from megatron_video.planning.cost import (
    NO_OVERLAP,
    DataParallelOverlap,
    Layout,
    StepTime,
    model_flops_per_step,
    step_time,
)
from megatron_video.planning.memory import (
    GIB,
    RECOMPUTE_MODES,
    StateBytes,
    Tokens,
    activation_peak_bytes,
    backward_workspace_bytes,
    model_state_bytes,
)
from megatron_video.planning.workload import VideoShape, pipeline_split, stage_params

POWERS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    states: StateBytes
    activations: float
    workspace: float  # backward gradient buffers of one block
    reserved: float
    time: StepTime
    mfu: float
    fits: bool

    @property
    def memory(self) -> float:
        return self.states.total + self.activations + self.workspace + self.reserved


@dataclass(frozen=True)
class Plan:
    cfg: SUVConfig
    shape: VideoShape
    global_batch: int
    cluster: ClusterSpec
    ranked: list[Estimate]  # fitting layouts, fastest first
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> number of layouts
    too_big: list[Estimate] = field(default_factory=list)  # valid layouts that do not fit, smallest first
    overlap: DataParallelOverlap = NO_OVERLAP  # the DP overlap flags the estimates assume


def estimate(cfg: SUVConfig, shape: VideoShape, global_batch: int, cluster: ClusterSpec, layout: Layout,
             ema_replicated: bool = False,
             overlap: DataParallelOverlap = NO_OVERLAP) -> Estimate:
    """Memory and time of one (valid) layout on the busiest device (the first pipeline stage)."""
    video = shape.video_tokens(cfg.patch_size)
    p = layout.cp
    tokens = Tokens(video=-(-video // p), text=shape.text_tokens, tp=layout.tp, sequence_parallel=layout.tp > 1)
    m = layout.micro_batches(global_batch)
    specs = cfg.block_specs()
    split = pipeline_split(len(specs), layout.pp)
    params = stage_params(cfg, layout.pp)
    worst_states, worst_act, worst_ws = None, 0.0, 0.0
    start = 0
    for i, count in enumerate(split):
        in_flight = min(layout.pp - i, m)  # 1F1B: stage i holds up to pp - i micro-batches
        act = activation_peak_bytes(cfg, specs[start:start + count], tokens, layout.micro_batch, layout.recompute,
                                    in_flight=in_flight, first_stage=i == 0, last_stage=i == layout.pp - 1)
        ws = backward_workspace_bytes(cfg, specs[start:start + count], tokens, layout.micro_batch)
        states = model_state_bytes(params[i], layout.tp, layout.dp * p, ema_replicated)
        if worst_states is None or states.total + act + ws > worst_states.total + worst_act + worst_ws:
            worst_states, worst_act, worst_ws = states, act, ws
        start += count
    assert worst_states is not None
    local = max(c.per_rank(layout.tp) for c in params)
    t_lat, h_lat, w_lat = shape.latent_thw()
    grid = (t_lat, h_lat // cfg.patch_size, w_lat // cfg.patch_size)
    time = step_time(cfg, layout, grid, shape.text_tokens, global_batch, cluster, local, overlap)
    useful = model_flops_per_step(cfg, video, shape.text_tokens, global_batch)
    mfu = useful / (layout.world * cluster.peak_tflops * 1e12 * time.total)
    reserved = cluster.reserved_gib * GIB
    fits = worst_states.total + worst_act + worst_ws + reserved <= cluster.memory_gib * GIB
    return Estimate(layout, worst_states, worst_act, worst_ws, reserved, time, mfu, fits)


def _reject_reason(cfg: SUVConfig, shape: VideoShape, global_batch: int, world: int, layout: Layout) -> str | None:
    t, p = layout.tp, layout.cp
    if cfg.num_heads % (t * p) != 0:
        return "heads not divisible by TP x CP"
    if layout.pp > cfg.num_blocks:
        return "more pipeline stages than blocks"
    if global_batch % (layout.dp * layout.micro_batch) != 0:
        return "global batch not divisible by micro-batch x DP"
    if p > 1:
        latent_t = shape.latent_thw()[0]
        if latent_t % p != 0:
            return "latent frames not divisible by CP"
        from megatron_video.models.suv_mmdit.skiparse_layout import validate_plan

        try:
            validate_plan(cfg, p, t, layout.cp_strategy)  # type: ignore[arg-type]
        except ValueError:
            return "CP plan cannot split some block's heads"
    return None


def enumerate_layouts(world: int, micro_batches: tuple[int, ...] = (1, 2, 4, 8),
                      recompute: tuple[str, ...] = RECOMPUTE_MODES, max_tp: int = 8, cp_strategy: str = "skiparse"
                      ) -> list[Layout]:
    out = []
    for tp in (x for x in POWERS if x <= max_tp):
        for cp in POWERS:
            for pp in POWERS:
                if world % (tp * cp * pp) != 0:
                    continue
                dp = world // (tp * cp * pp)
                for mbs in micro_batches:
                    for mode in recompute:
                        out.append(Layout(tp, cp, pp, dp, mbs, mode, cp_strategy))
    return out


def plan(cfg: SUVConfig, shape: VideoShape, global_batch: int, cluster: ClusterSpec,
         micro_batches: tuple[int, ...] = (1, 2, 4, 8), recompute: tuple[str, ...] = RECOMPUTE_MODES,
         max_tp: int | None = None, cp_strategy: str = "skiparse", ema_replicated: bool = False,
         overlap: DataParallelOverlap = NO_OVERLAP, fixed: dict[str, int | str] | None = None) -> Plan:
    """Every valid layout estimated; `fixed` pins some of tp / cp / pp / micro_batch / recompute."""
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    for mode in recompute:
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be among {RECOMPUTE_MODES}, got {mode!r}")
    shape.video_tokens(cfg.patch_size)  # shape errors before the enumeration
    max_tp = max_tp if max_tp is not None else cluster.devices_per_node
    fixed = fixed or {}
    unknown = set(fixed) - {"tp", "cp", "pp", "micro_batch", "recompute"}
    if unknown:
        raise ValueError(f"cannot pin {sorted(unknown)}; pin tp, cp, pp, micro_batch or recompute")
    ranked, too_big, rejected = [], [], {}
    for layout in enumerate_layouts(cluster.num_devices, micro_batches, recompute, max_tp, cp_strategy):
        if any(getattr(layout, k) != v for k, v in fixed.items()):
            continue
        reason = _reject_reason(cfg, shape, global_batch, cluster.num_devices, layout)
        if reason is not None:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        est = estimate(cfg, shape, global_batch, cluster, layout, ema_replicated, overlap)
        (ranked if est.fits else too_big).append(est)
    ranked.sort(key=lambda e: (e.time.total, e.memory))
    too_big.sort(key=lambda e: e.memory)
    return Plan(cfg, shape, global_batch, cluster, ranked, rejected, too_big, overlap)


def recompute_flags(mode: str) -> list[str]:
    if mode == "full":
        return ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if mode == "selective":
        return ["--recompute-granularity", "selective", "--recompute-modules", "mlp"]  # the FFN half
    return []


def launch_flags(est: Estimate, global_batch: int, device: str,
                 overlap: DataParallelOverlap = NO_OVERLAP) -> list[str]:
    """Flags of `pretrain_t2v.py` / `pretrain_i2v.py` for this layout (and the DP overlap it assumed)."""
    lay = est.layout
    flags = ["--device", device, "--bf16", "--use-distributed-optimizer",
             "--tensor-model-parallel-size", str(lay.tp)]
    if lay.tp > 1:
        flags.append("--sequence-parallel")
    flags += ["--context-parallel-size", str(lay.cp), "--pipeline-model-parallel-size", str(lay.pp),
              "--micro-batch-size", str(lay.micro_batch), "--global-batch-size", str(global_batch)]
    flags += ["--overlap-grad-reduce"] if overlap.overlap_grad_reduce else []
    flags += ["--overlap-param-gather"] if overlap.overlap_param_gather else []
    if overlap.bucket_size is not None:
        flags += ["--ddp-bucket-size", str(overlap.bucket_size)]
    return flags + recompute_flags(lay.recompute)


def launch_env(est: Estimate, global_batch: int) -> dict[str, str]:
    """The environment variables of examples/opensoraplan1.5/*.sh for this layout."""
    lay = est.layout
    return {"TP": str(lay.tp), "CP": str(lay.cp), "PP": str(lay.pp), "MBS": str(lay.micro_batch),
            "GBS": str(global_batch), "RECOMPUTE": lay.recompute}


HEADER = ("rank", "TP", "CP", "PP", "DP", "MBS", "GA", "recompute", "mem GiB", "states", "act", "ws", "step s",
          "vs best", "compute", "TP comm", "CP comm", "PP", "DP comm", "MFU")


def _row(i: int | str, e: Estimate, global_batch: int, best: float) -> tuple[str, ...]:
    lay, t = e.layout, e.time
    g = GIB
    return (str(i), str(lay.tp), str(lay.cp), str(lay.pp), str(lay.dp), str(lay.micro_batch),
            str(lay.micro_batches(global_batch)), lay.recompute, f"{e.memory / g:.1f}", f"{e.states.total / g:.1f}",
            f"{e.activations / g:.1f}", f"{e.workspace / g:.1f}", f"{t.total:.2f}",
            f"+{100 * (t.total / best - 1):.1f}%", f"{t.compute:.2f}",
            f"{t.tp_comm:.2f}", f"{t.cp_comm:.2f}", f"{t.pp_p2p + t.bubble:.2f}", f"{t.dp_comm:.2f}",
            f"{100 * e.mfu:.1f}%")


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [HEADER, *rows])


def format_plan(result: Plan, top: int = 10, mark: Layout | None = None) -> str:
    c = result.cluster
    lines = [f"model: {result.cfg.num_blocks} blocks, hidden {result.cfg.hidden_size}; video {result.shape} -> "
             f"latent {'x'.join(map(str, result.shape.latent_thw()))}, "
             f"{result.shape.video_tokens(result.cfg.patch_size)} video + {result.shape.text_tokens} text tokens; "
             f"global batch {result.global_batch}",
             f"cluster: {c.num_devices} x {c.memory_gib:g} GiB, {c.peak_tflops:g} TFLOP/s at "
             f"{c.compute_efficiency:.0%} efficiency, {c.intra_node_gbps:g} / {c.inter_node_gbps:g} GB/s "
             f"intra / inter node, {c.reserved_gib:g} GiB reserved"]
    if not result.ranked:
        lines.append("no layout fits in memory.")
        if result.too_big:
            best = result.too_big[0]
            lines.append(f"smallest needs {best.memory / GIB:.1f} GiB: "
                         + " ".join(launch_flags(best, result.global_batch, c.device, result.overlap)))
        return "\n".join(lines)
    fastest = result.ranked[0].time.total
    rows = [_row(i + 1, e, result.global_batch, fastest) for i, e in enumerate(result.ranked[:top])]
    if mark is not None:
        for i, e in enumerate(result.ranked):
            if e.layout == mark and i >= top:
                rows.append(_row(f"{i + 1}*", e, result.global_batch, fastest))
    lines += [f"{len(result.ranked)} layouts fit ({len(result.too_big)} valid ones do not); fastest first "
              "(step times within ~5% are ties at this model's accuracy: one efficiency factor, no overlap of "
              "TP/CP traffic):", format_table(rows)]
    best = result.ranked[0]
    lines.append("best: " + " ".join(launch_flags(best, result.global_batch, c.device, result.overlap)))
    lines.append("env:  " + " ".join(f"{k}={v}" for k, v in launch_env(best, result.global_batch).items()))
    return "\n".join(lines)


def rank_of(result: Plan, layout: Layout) -> int | None:
    """1-based rank of `layout` among the fitting layouts, None if it does not fit or is invalid."""
    for i, e in enumerate(result.ranked):
        if e.layout == layout:
            return i + 1
    return None


__all__ = ["Estimate", "Plan", "enumerate_layouts", "estimate", "format_plan", "launch_env", "launch_flags", "plan",
           "rank_of", "recompute_flags"]
