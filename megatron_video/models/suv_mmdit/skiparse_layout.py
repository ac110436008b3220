"""Which video tokens each context-parallel (CP) rank holds, block by block: pure index logic, no communication.

A *layout* `(k, mode)` assigns every token j of the padded video sequence (length `n_pad`) to one CP rank:

- sub-sequence s(j) of the skiparse pattern: single skip s = j mod k, group skip s = (j div k) mod k, and
  s = 0 for the contiguous layout (k = 1, "full");
- k >= P (P | k): rank s mod P owns whole sub-sequences (k / P of them), so a skiparse attention with that
  pattern runs locally;
- k < P (k | P): sub-sequence s is spread over the d = P / k consecutive ranks s*d .. s*d+d-1, each holding
  one contiguous range of U-periods; those d ranks run Ulysses among themselves (k = 1: all P ranks).

Under Megatron sequence parallelism a CP rank's tokens are further split over its TP ranks. A token's TP
*slot* is fixed for all layouts, slot(j) = (j div U) mod S with U = lcm of every block's k^2 and S the TP size,
and each rank's local list is ordered by (slot, j), so TP rank t always holds the slot-t tokens: a layout
change is an all-to-all among the CP peers of one TP rank. The padding `n_pad` is a multiple of U * S * P,
which makes every (CP rank, slot) share equal. Padding tokens are invalid keys and their outputs are dropped,
and the membership of a real token in a sub-sequence does not depend on the padding, so results equal the
released model's. Inside a sub-sequence the token order is irrelevant (RoPE is applied with true positions
before attention; attention is equivariant in queries and invariant in keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from megatron_video.models.suv_mmdit.config import BlockSpec, SUVConfig

Strategy = Literal["ulysses", "skiparse"]
STRATEGIES = ("ulysses", "skiparse")


@dataclass(frozen=True)
class Layout:
    """Token-to-rank assignment: skiparse pattern (k, mode) of the sub-sequences; k = 1 is contiguous."""

    k: int
    mode: str  # "full" (k = 1), "single", "group"

    def __post_init__(self) -> None:
        if (self.k == 1) != (self.mode == "full"):
            raise ValueError(f"layout k={self.k} with mode {self.mode!r}: k = 1 exactly when mode is 'full'")


CONTIGUOUS = Layout(1, "full")


@dataclass(frozen=True)
class Geometry:
    """Sizes that fix the index maps: CP size P, TP slots S (TP size under sequence parallelism, else 1),
    period U (lcm of the model's k^2)."""

    cp: int
    slots: int
    period: int

    def padded_tokens(self, n: int) -> int:
        unit = self.period * self.slots * self.cp
        return -(-n // unit) * unit


def period_of(cfg: SUVConfig) -> int:
    return math.lcm(*(k * k for k in cfg.sparse_n))


def subsequence(ids: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """Skiparse sub-sequence of each token id under pattern (k, mode)."""
    if mode == "single":
        return ids % k
    if mode == "group":
        return (ids // k) % k
    return torch.zeros_like(ids)


def ulysses_size(layout: Layout, cp: int) -> int:
    """Ranks sharing one sub-sequence of `layout` (they run Ulysses among themselves); 1 = none."""
    return 1 if layout.k >= cp else cp // layout.k


def check_layout(layout: Layout, cp: int) -> None:
    if layout.k % cp != 0 and cp % layout.k != 0:
        raise ValueError(f"layout k={layout.k} and CP size {cp}: one must divide the other")


@lru_cache(maxsize=256)
def owners(layout: Layout, geo: Geometry, n_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner CP rank of every token, its position in that rank's local list), both (n_pad,) int64."""
    check_layout(layout, geo.cp)
    if n_pad % (geo.period * geo.slots * geo.cp) != 0:
        raise ValueError(f"padded length {n_pad} is not a multiple of U*S*P = {geo.period * geo.slots * geo.cp}")
    ids = torch.arange(n_pad)
    s = subsequence(ids, layout.k, layout.mode)
    block = ids // geo.period
    if layout.k >= geo.cp:
        owner = s % geo.cp
    else:
        d = geo.cp // layout.k
        owner = s * d + block // (n_pad // geo.period // d)
    slot = block % geo.slots
    order = torch.argsort(owner * (geo.slots * n_pad) + slot * n_pad + ids)  # by (owner, slot, j)
    position = torch.empty_like(ids)
    per_rank = n_pad // geo.cp
    position[order] = torch.arange(n_pad) % per_rank
    return owner, position


@lru_cache(maxsize=256)
def local_ids(layout: Layout, geo: Geometry, n_pad: int, rank: int) -> torch.Tensor:
    """Token ids held by CP rank `rank`, in local order (slot-major; TP rank t holds the t-th 1/S)."""
    owner, position = owners(layout, geo, n_pad)
    mine = torch.nonzero(owner == rank).squeeze(1)
    out = torch.empty_like(mine)
    out[position[mine]] = mine
    return out


def slot_of(ids: torch.Tensor, geo: Geometry) -> torch.Tensor:
    return (ids // geo.period) % geo.slots


@dataclass(frozen=True)
class Redistribution:
    """One all-to-all among the CP peers of a TP rank moving its slot's tokens from layout A to layout B."""

    send_order: torch.Tensor  # rows of the local A-chunk, grouped by destination rank
    send_counts: tuple[int, ...]
    recv_index: torch.Tensor  # received row of each B-chunk position
    recv_counts: tuple[int, ...]


@lru_cache(maxsize=256)
def redistribution(a: Layout, b: Layout, geo: Geometry, n_pad: int, rank: int, slot: int) -> Redistribution:
    owner_a, _ = owners(a, geo, n_pad)
    owner_b, pos_b = owners(b, geo, n_pad)
    chunk = n_pad // (geo.cp * geo.slots)
    mine = local_ids(a, geo, n_pad, rank)[slot * chunk:(slot + 1) * chunk]
    dest = owner_b[mine]
    send_order = torch.argsort(dest * n_pad + pos_b[mine])
    target = local_ids(b, geo, n_pad, rank)[slot * chunk:(slot + 1) * chunk]
    src = owner_a[target]
    arrival = torch.argsort(src * n_pad + pos_b[target])  # arrival[i] = B-position of received row i
    recv_index = torch.argsort(arrival)
    counts = tuple(int(c) for c in torch.bincount(dest, minlength=geo.cp))
    recv_counts = tuple(int(c) for c in torch.bincount(src, minlength=geo.cp))
    return Redistribution(send_order, counts, recv_index, recv_counts)


# ----------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class BlockPlan:
    """How one block runs under CP: the layout it computes in, the layout its input arrives in, the layout
    of its long-skip input (decoder stage starts), and the Ulysses group size of its attention (1 = local)."""

    index: int
    layout: Layout
    layout_in: Layout
    skip_layout: Layout | None
    ulysses: int


def _attention_cost(layout: Layout, cp: int) -> float:
    """Relative all-to-all volume of one block's attention: q, k, v and output cross (d - 1) / d."""
    d = ulysses_size(layout, cp)
    return 4.0 * (d - 1) / d


def _heads_allow(d: int, heads_per_tp: int) -> bool:
    return d == 1 or heads_per_tp % d == 0


def candidate_layouts(spec: BlockSpec, cp: int, heads_per_tp: int, strategy: Strategy) -> list[Layout]:
    """Ulysses everywhere, or for the skiparse-aware strategy: the block's own pattern when P | k (local
    attention), and when k | P both its pattern with Ulysses inside each sub-sequence and plain Ulysses."""
    if strategy not in STRATEGIES:
        raise ValueError(f"context-parallel strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "ulysses" or spec.k == 1 or cp == 1:
        return [CONTIGUOUS]
    own = Layout(spec.k, spec.mode)
    if spec.k % cp == 0:
        return [own]
    if cp % spec.k != 0 or not _heads_allow(cp // spec.k, heads_per_tp):
        return [CONTIGUOUS]
    return [own, CONTIGUOUS]


def choose_layouts(specs: list[BlockSpec], cp: int, heads_per_tp: int, strategy: Strategy) -> list[Layout]:
    """Per-block layouts minimising the all-to-all volume along the block chain (dynamic programming; an
    attention costs 4 (d - 1) / d local tensors, a layout change one tensor crossing (P - 1) / P; the entry
    layout is free and long-skip changes are not counted)."""
    change = (cp - 1) / cp
    best: dict[Layout, tuple[float, list[Layout]]] = {}
    for spec in specs:
        step: dict[Layout, tuple[float, list[Layout]]] = {}
        for layout in candidate_layouts(spec, cp, heads_per_tp, strategy):
            attention = _attention_cost(layout, cp)
            if not best:
                step[layout] = (attention, [layout])
                continue
            cost, path = min(((c + (0.0 if prev == layout else change), p) for prev, (c, p) in best.items()),
                             key=lambda item: item[0])
            step[layout] = (cost + attention, path + [layout])
        best = step
    return min(best.values(), key=lambda item: item[0])[1]


def plan_blocks(cfg: SUVConfig, cp: int, tp: int, strategy: Strategy = "skiparse") -> list[BlockPlan]:
    """The static per-block plan (depends on the model and the CP/TP sizes, not on the input shape)."""
    specs = cfg.block_specs()
    layouts = choose_layouts(specs, cp, cfg.num_heads // tp, strategy)
    last_of_stage = {spec.stage: spec.index for spec in specs}
    plans = []
    for spec, layout in zip(specs, layouts):
        skip_layout = None
        if spec.skip_in is not None:
            partner = cfg.num_stages - 1 - spec.stage
            skip_layout = layouts[last_of_stage[partner]]
        layout_in = layouts[spec.index - 1] if spec.index > 0 else layout
        plans.append(BlockPlan(spec.index, layout, layout_in, skip_layout, ulysses_size(layout, cp)))
    return plans


def validate_plan(cfg: SUVConfig, cp: int, tp: int, strategy: Strategy = "skiparse") -> list[BlockPlan]:
    """The plan, or a ValueError naming the first block whose attention cannot be split this way."""
    if cp < 1 or tp < 1:
        raise ValueError(f"context- and tensor-parallel sizes must be >= 1, got CP={cp}, TP={tp}")
    if cfg.num_heads % tp != 0:
        raise ValueError(f"attention heads ({cfg.num_heads}) are not divisible by TP size {tp}")
    plans = plan_blocks(cfg, cp, tp, strategy)
    heads_per_tp = cfg.num_heads // tp
    for plan, spec in zip(plans, cfg.block_specs()):
        if not _heads_allow(plan.ulysses, heads_per_tp):
            raise ValueError(
                f"block {spec.index} (stage {spec.stage}, sparsity k={spec.k}) needs Ulysses over {plan.ulysses} "
                f"context-parallel ranks, but its {heads_per_tp} heads per TP rank (heads {cfg.num_heads} / TP "
                f"{tp}) do not divide by {plan.ulysses}; choose CP and TP with heads divisible by TP x CP"
                + (" or a CP size dividing every k > 1" if strategy == "skiparse" else "")
            )
    return plans


__all__ = [
    "BlockPlan", "CONTIGUOUS", "Geometry", "Layout", "Redistribution", "STRATEGIES", "Strategy",
    "candidate_layouts", "choose_layouts",
    "local_ids", "owners", "period_of", "plan_blocks", "redistribution", "slot_of", "subsequence",
    "ulysses_size", "validate_plan",
]
