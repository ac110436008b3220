"""v1.3 per-rank discard (DESIGN §8, option): drop the gradient of anomalous data-parallel ranks.

Before the data-parallel gradient reduction, every DP rank measures the norm gn_i of its *local* gradient
(its model replica's grads, TP-duplicated params counted once, summed over the model-parallel group) and the
DP group all-gathers the norms. A rank is anomalous when gn_i is NaN/Inf or above μ + 3·√var, where μ/var are
an EMA (decay d) of the max-over-ranks norm: first step μ = max_i gn_i, var = 0; afterwards, with m the
largest norm among the normal ranks, μ ← d·μ + (1−d)·m, then var ← d·var + (1−d)·(μ − m)². Anomalous ranks
zero their gradient; the M normal ranks scale theirs by N/M, so megatron's average over N ranks becomes the
average over the M normal ones. If every rank is anomalous, all gradients are zeroed and `skip_step` is set:
the caller must skip the optimizer update (`AdaptiveClipOptimizer.step(skip_update=True)`).

The "ranks" are the members of the DDP gradient-reduction group (DP × CP): with context parallelism each CP
rank's partial gradient is tested on its own. The reduction must not have started, so `overlap_grad_reduce`
must be off; run `apply()` between the backward passes and `finish_grad_sync()`, e.g. through
`finalize_with_rank_discard`, which wraps megatron's `finalize_model_grads` for the pipeline schedules.
With Megatron sequence parallelism the replicated norm weights still hold per-TP-rank partial grads at that
point; the local norm then counts TP rank 0's part only (a small under-estimate, the same on every rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_video.optim.clip import TooManyExtremeStepsError


@dataclass(frozen=True)
class RankDiscardConfig:
    decay: float = 0.99
    num_sigma: float = 3.0
    max_consecutive_all_discarded: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"discard EMA decay must be in (0, 1), got {self.decay}")
        if self.num_sigma < 0:
            raise ValueError(f"num_sigma must be >= 0, got {self.num_sigma}")
        if self.max_consecutive_all_discarded < 1:
            raise ValueError("max_consecutive_all_discarded must be >= 1")


@dataclass(frozen=True)
class RankDiscardDecision:
    norms: tuple[float, ...]  # local grad norm of every rank of the group, in group-rank order
    threshold: float
    discarded: tuple[int, ...]  # group ranks whose gradient is dropped
    factors: tuple[float, ...]  # per-rank multiplier: 0 (discarded) or N/M
    skip_step: bool
    mu: float
    var: float


class RankDiscardStats:
    """The pure decision logic and its checkpointable state (identical on every rank)."""

    def __init__(self, config: RankDiscardConfig | None = None) -> None:
        self.config = config or RankDiscardConfig()
        self.mu: float | None = None
        self.var = 0.0
        self.steps = 0
        self.discarded_count = 0
        self.consecutive_all_discarded = 0

    def threshold(self) -> float:
        return math.inf if self.mu is None else self.mu + self.config.num_sigma * math.sqrt(self.var)

    def decide(self, norms: list[float]) -> RankDiscardDecision:
        if not norms:
            raise ValueError("need at least one rank norm")
        norms = [float(n) for n in norms]
        thr = self.threshold()
        bad = [i for i, n in enumerate(norms) if not math.isfinite(n) or n > thr]
        good = [n for i, n in enumerate(norms) if i not in bad]
        self.steps += 1
        self.discarded_count += len(bad)
        if not good:
            self.consecutive_all_discarded += 1
            if self.consecutive_all_discarded >= self.config.max_consecutive_all_discarded:
                raise TooManyExtremeStepsError(
                    f"every data-parallel rank's gradient was anomalous {self.consecutive_all_discarded} "
                    f"steps in a row (norms {norms}, threshold {thr:.4g}); training is diverging")
            return RankDiscardDecision(tuple(norms), thr, tuple(bad), (0.0,) * len(norms), True,
                                       math.nan if self.mu is None else self.mu, self.var)
        self.consecutive_all_discarded = 0
        m = max(good)
        if self.mu is None:
            self.mu, self.var = m, 0.0
        else:
            d = self.config.decay
            self.mu = d * self.mu + (1.0 - d) * m
            self.var = d * self.var + (1.0 - d) * (self.mu - m) ** 2
        scale = len(norms) / len(good)
        factors = tuple(0.0 if i in bad else scale for i in range(len(norms)))
        return RankDiscardDecision(tuple(norms), thr, tuple(bad), factors, False, self.mu, self.var)

    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu, "var": self.var, "steps": self.steps, "discarded_count": self.discarded_count,
                "consecutive_all_discarded": self.consecutive_all_discarded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"mu", "var", "steps", "discarded_count", "consecutive_all_discarded"} - set(state)
        if missing:
            raise KeyError(f"rank-discard state is missing {sorted(missing)}")
        self.mu = None if state["mu"] is None else float(state["mu"])
        self.var = float(state["var"])
        self.steps = int(state["steps"])
        self.discarded_count = int(state["discarded_count"])
        self.consecutive_all_discarded = int(state["consecutive_all_discarded"])


def local_grad_norm(
    model_chunks: list[torch.nn.Module], model_parallel_group: dist.ProcessGroup | None
) -> float:
    """L2 norm of this replica's unreduced `main_grad`s (TP duplicates and shared params counted once)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    total = None
    for chunk in model_chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None or not param_is_not_shared(param):
                continue
            if not param_is_not_tensor_parallel_duplicate(param):
                continue
            sq = grad.detach().float().square().sum()
            total = sq if total is None else total + sq
    if total is None:
        device = next(iter(model_chunks[0].parameters())).device
        total = torch.zeros((), dtype=torch.float32, device=device)
    total = total.reshape(1)
    if model_parallel_group is not None and dist.get_world_size(model_parallel_group) > 1:
        dist.all_reduce(total, group=model_parallel_group)
    return math.sqrt(total.item())


class PerRankDiscard:
    """Measures, decides and applies the v1.3 per-rank discard on megatron DDP model chunks."""

    def __init__(
        self,
        config: RankDiscardConfig | None = None,
        data_parallel_group: dist.ProcessGroup | None = None,
        model_parallel_group: dist.ProcessGroup | None = None,
    ) -> None:
        from megatron.core import parallel_state as mpu

        self.stats = RankDiscardStats(config)
        self.dp_group = data_parallel_group or mpu.get_data_parallel_group(with_context_parallel=True)
        self.mp_group = model_parallel_group or mpu.get_model_parallel_group()
        self.last_decision: RankDiscardDecision | None = None  # for logging after a wrapped finalize

    @torch.no_grad()
    def apply(self, model_chunks: list[torch.nn.Module], loss_scale: float = 1.0) -> RankDiscardDecision:
        """Test, zero or rescale this rank's local grads. `loss_scale` (fp16: the optimizer's current loss
        scale) is divided out of the norms so the statistics do not jump when the scale changes."""
        if not loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0, got {loss_scale}")
        for chunk in model_chunks:
            ddp_config = getattr(chunk, "ddp_config", None)
            if ddp_config is None:
                raise TypeError("per-rank discard needs megatron DistributedDataParallel model chunks")
            if ddp_config.overlap_grad_reduce:
                raise ValueError("per-rank discard needs overlap_grad_reduce=False: the gradient must "
                                 "still be local when it is tested")
        norm = local_grad_norm(model_chunks, self.mp_group) / loss_scale
        size = dist.get_world_size(self.dp_group)
        device = next(iter(model_chunks[0].parameters())).device
        gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(size)]
        mine = torch.tensor([norm], dtype=torch.float64, device=device)
        dist.all_gather(gathered, mine, group=self.dp_group)
        decision = self.stats.decide([t.item() for t in gathered])
        factor = decision.factors[dist.get_rank(self.dp_group)]
        for chunk in model_chunks:
            if factor == 0.0:
                for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                    buffer.grad_data.zero_()  # zero, not scale: 0 * NaN would stay NaN
            elif factor != 1.0:
                chunk.scale_gradients(factor)
        self.last_decision = decision
        return decision

    def state_dict(self) -> dict[str, Any]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state)


def finalize_with_rank_discard(
    discard: PerRankDiscard, finalize_fn: Callable | None = None, loss_scale_fn: Callable[[], float] | None = None
) -> Callable:
    """A `finalize_model_grads_func` for megatron's schedules: discard first, then the usual finalize.
    `loss_scale_fn` (fp16) returns the current loss scale, e.g. `lambda: optimizer.get_loss_scale().item()`."""
    if finalize_fn is None:
        from megatron.core.distributed import finalize_model_grads as finalize_fn

    def finalize(model: list[torch.nn.Module], *args: Any, **kwargs: Any) -> Any:
        discard.apply(model, loss_scale_fn() if loss_scale_fn is not None else 1.0)
        return finalize_fn(model, *args, **kwargs)

    return finalize
