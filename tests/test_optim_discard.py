"""v1.3 per-rank discard: the decision rule by hand, and DP = 2 with megatron DDP against the local grads."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_video.optim import RankDiscardConfig, RankDiscardStats, TooManyExtremeStepsError
from tests.harness import run_distributed


def test_discard_rule_by_hand():
    s = RankDiscardStats(RankDiscardConfig(decay=0.9))
    d = s.decide([1.0, 2.0, 1.5, 1.2])
    assert d.discarded == () and d.factors == (1.0,) * 4 and not d.skip_step
    assert (s.mu, s.var) == (2.0, 0.0)  # first step: μ = max over ranks
    mu, var = 2.0, 0.0
    d = s.decide([1.0, 1.8, 1.9, 1.1])
    m = 1.9
    mu = 0.9 * mu + 0.1 * m
    var = 0.9 * var + 0.1 * (mu - m) ** 2  # with the updated μ
    assert d.threshold == 2.0 and d.discarded == ()
    assert (s.mu, s.var) == (pytest.approx(mu), pytest.approx(var))
    thr = mu + 3 * math.sqrt(var)
    d = s.decide([1.0, 9.0, float("nan"), 1.5])
    assert d.threshold == pytest.approx(thr)
    assert d.discarded == (1, 2) and d.factors == (2.0, 0.0, 0.0, 2.0)  # N/M = 4/2
    m = 1.5  # the max over the normal ranks drives the statistics
    mu = 0.9 * mu + 0.1 * m
    var = 0.9 * var + 0.1 * (mu - m) ** 2
    assert (s.mu, s.var) == (pytest.approx(mu), pytest.approx(var))
    assert s.discarded_count == 2


def test_all_discarded_skips_then_stops_and_state_round_trip():
    s = RankDiscardStats(RankDiscardConfig(max_consecutive_all_discarded=2))
    s.decide([1.0, 1.0])
    d = s.decide([50.0, float("inf")])
    assert d.skip_step and d.factors == (0.0, 0.0) and s.mu == 1.0
    t = RankDiscardStats(RankDiscardConfig(max_consecutive_all_discarded=2))
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    with pytest.raises(TooManyExtremeStepsError, match="anomalous 2"):
        t.decide([60.0, 70.0])


def _discard_run() -> list[dict]:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from megatron_video.optim import (
        OptimizerOptions,
        build_optimizer,
        build_rank_discard,
        finalize_with_rank_discard,
        gather_sample_ids,
    )
    from megatron_video.parallel import initialize_parallel
    from tests.test_optim_helpers import HIDDEN, SEQ, build_model, full_weights, loss_fn

    initialize_parallel()  # DP = 2
    rank = mpu.get_data_parallel_rank()
    model = build_model(1, full_weights(5), use_distributed_optimizer=False)
    options = OptimizerOptions(lr=1e-2, precision="fp32", use_distributed_optimizer=False,
                               clip_mode="rank_discard", clip_ema_decay=0.9, adam_eps=1e-8)
    opt = build_optimizer([model], options)
    discard = build_rank_discard(options)
    finalize = finalize_with_rank_discard(discard)
    # per step: loss factor of rank 0, rank 1
    plan = [(1, 1), (1, 1), (1, 1), (1, 100), (float("nan"), 1), (1e4, 1e4), (1, 1)]
    gen = torch.Generator().manual_seed(2)
    out = []
    for factors in plan:
        x = torch.randn(SEQ, 2, HIDDEN, generator=gen)
        target = torch.randn(SEQ, 2, HIDDEN, generator=gen)
        model.zero_grad_buffer()
        opt.zero_grad()
        loss_fn(model(x[:, rank:rank + 1]), target[:, rank:rank + 1], factors[rank]).backward()
        local = torch.cat([p.main_grad.reshape(-1).clone() for p in model.module.parameters()])
        gathered = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(gathered, local)
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.module.parameters()])
        finalize([model])
        reduced = torch.cat([p.main_grad.reshape(-1).clone() for p in model.module.parameters()])
        decision = discard.last_decision
        record = opt.step(skip_update=decision.skip_step)
        after = torch.cat([p.detach().reshape(-1).clone() for p in model.module.parameters()])
        keep = [r for r in range(2) if r not in decision.discarded]
        expected = sum(gathered[r] for r in keep) / len(keep) if keep else torch.zeros_like(local)
        out.append({
            "discarded": decision.discarded, "skip": decision.skip_step, "skipped": record.skipped,
            "norm_err": max(abs(decision.norms[r] - gathered[r].norm().item()) / gathered[r].norm().item()
                            for r in range(2) if math.isfinite(decision.norms[r])),
            "grad_err": (reduced - expected).abs().max().item(),
            "unchanged": torch.equal(before, after),
            "batch_ids": gather_sample_ids([10 * rank + 1, 10 * rank]),
        })
    return out


@pytest.mark.slow
def test_per_rank_discard_dp2():
    results = run_distributed(_discard_run, 2)
    assert [s["discarded"] for s in results[0]] == [s["discarded"] for s in results[1]]
    for steps in results:
        assert [s["discarded"] for s in steps] == [(), (), (), (1,), (0,), (0, 1), ()]
        for s in steps:
            assert s["norm_err"] < 1e-5  # the gathered norms are the ranks' local grad norms
            assert s["grad_err"] < 1e-6  # reduced grad = mean of the kept ranks' local grads
        assert [s["skip"] for s in steps] == [False] * 5 + [True, False]
        assert all(s["batch_ids"] == [0, 1, 10, 11] for s in steps)  # the global batch's ids on every rank
        assert steps[5]["skipped"] and steps[5]["unchanged"]
        # a discarded rank does not stop the step
        assert not steps[3]["unchanged"] and not steps[4]["unchanged"]
