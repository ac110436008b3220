"""Bytes the context-parallel group moves per training step (forward + backward), from the real layout logic.

`planned_cp_traffic` walks the same block plans, index maps and redistributions the model uses
(context_parallel.py) and lists every CP-group collective one rank issues, with its payload (what
`CommCounter` records: the local input of the collective) and the bytes it really puts on the wire. The
equivalence tests check it against `CommCounter` on the running model; the benchmark uses it for sizes that
cannot run here (the 8.5B model at 121x576x1024).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_video.models.suv_mmdit.config import SUVConfig
from megatron_video.models.suv_mmdit.skiparse_layout import (
    Geometry,
    Layout,
    Strategy,
    period_of,
    redistribution,
    validate_plan,
)


@dataclass(frozen=True)
class Collective:
    op: str  # torch.distributed name, as CommCounter records it
    group_size: int
    payload_bytes: int  # local input of the call
    wire_bytes: float  # bytes this rank sends to other ranks
    block: int | None  # block index, None for the model exit
    what: str


def planned_cp_traffic(cfg: SUVConfig, cp: int, tp: int, sequence_parallel: bool, grid: tuple[int, int, int],
                       batch: int, text_len: int, element_bytes: int, strategy: Strategy = "skiparse",
                       rank: int = 0) -> list[Collective]:
    """CP-group collectives of one training step of CP rank `rank` (TP rank 0) for latent tokens `grid`
    (T, H/p, W/p)."""
    plans = validate_plan(cfg, cp, tp, strategy)
    sp = sequence_parallel and tp > 1
    geo = Geometry(cp, tp if sp else 1, period_of(cfg))
    n_pad = geo.padded_tokens(grid[0] * grid[1] * grid[2])
    text_pad = text_len + ((-text_len) % tp if sp else 0)
    hidden, heads_per_tp = cfg.hidden_size, cfg.num_heads // tp
    chunk = n_pad // (cp * geo.slots)  # video rows of one (CP rank, TP slot)
    out: list[Collective] = []

    def move(source: Layout, target: Layout, block: int, what: str) -> None:
        if source == target:
            return
        plan = redistribution(source, target, geo, n_pad, rank, 0)
        payload = chunk * batch * hidden * element_bytes
        wire = (chunk - plan.send_counts[rank]) * batch * hidden * element_bytes
        for direction in ("fwd", "bwd"):  # the backward returns the gradient the same way
            out.append(Collective("all_to_all_single", cp, payload, wire, block, f"{what} {direction}"))

    for plan, spec in zip(plans, cfg.block_specs()):
        if spec.skip_in is not None and plan.skip_layout == plan.layout_in:
            move(plan.layout_in, plan.layout, spec.index, "layout change (after long skip)")
        else:
            move(plan.layout_in, plan.layout, spec.index, "layout change")
            if spec.skip_in is not None:
                move(plan.skip_layout, plan.layout, spec.index, "long-skip layout change")
        d = plan.ulysses
        qkv = (n_pad // cp) * batch * heads_per_tp * cfg.head_dim * element_bytes
        if d > 1:
            for what in ("q", "k", "v", "out"):
                for direction in ("fwd", "bwd"):
                    out.append(Collective("all_to_all_single", d, qkv, qkv * (d - 1) / d, spec.index,
                                          f"ulysses {what} {direction}"))
        if not spec.context_pre_only:
            text = text_pad * batch * heads_per_tp * cfg.head_dim * element_bytes
            if d == cp:
                out.append(Collective("all_gather_into_tensor", cp, text // cp, text * (cp - 1) / cp, spec.index,
                                      "text heads fwd"))
                out.append(Collective("reduce_scatter_tensor", cp, text, text * (cp - 1) / cp, spec.index,
                                      "text heads bwd"))
            else:
                for direction in ("fwd", "bwd"):
                    out.append(Collective("all_reduce", cp, text, 2 * text * (cp - 1) / cp, spec.index,
                                          f"text k-copy mean {direction}"))
    rows = (n_pad // cp) * batch * cfg.patch_out_features * element_bytes
    out.append(Collective("all_gather_into_tensor", cp, rows, rows * (cp - 1), None, "output gather fwd"))
    return out


def summarize(traffic: list[Collective], cfg: SUVConfig, cp: int) -> dict[str, float]:
    """Totals: all-to-all payload / wire bytes overall and in blocks with k >= P, and all CP bytes."""
    k_of = {spec.index: spec.k for spec in cfg.block_specs()}
    a2a = [c for c in traffic if c.op == "all_to_all_single"]
    sparse = [c for c in a2a if c.block is not None and k_of[c.block] >= cp]
    return {
        "a2a_payload": sum(c.payload_bytes for c in a2a), "a2a_wire": sum(c.wire_bytes for c in a2a),
        "a2a_payload_k_ge_p": sum(c.payload_bytes for c in sparse),
        "a2a_wire_k_ge_p": sum(c.wire_bytes for c in sparse),
        "all_payload": sum(c.payload_bytes for c in traffic), "all_wire": sum(c.wire_bytes for c in traffic),
    }


__all__ = ["Collective", "planned_cp_traffic", "summarize"]
