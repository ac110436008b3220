"""Adaptive gradient clipping (DESIGN §8): the EMA-3σ rule by hand, the wrapper's clip/skip, and the real
megatron-core distributed optimizer at TP = 2 × DP = 2 against a one-process reference."""

from __future__ import annotations

import io
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from megatron_video.optim import (
    AdaptiveClipOptimizer,
    EmaClipConfig,
    EmaThresholdClipper,
    TooManyExtremeStepsError,
)
from tests.harness import run_distributed

REFERENCE = EmaClipConfig(warmup_steps=0)  # the v1.5 rule exactly (no warm-up)


def test_first_step_rule():
    c = EmaThresholdClipper(REFERENCE)
    d = c.decide(0.2)
    assert (c.mu, c.var) == (pytest.approx(0.6), 0.0)  # μ = min(3g, 1)
    assert not d.clipped and not d.extreme and d.scale == 1.0 and d.threshold == math.inf
    c2 = EmaThresholdClipper(REFERENCE)
    d2 = c2.decide(50.0)  # no statistics yet: a large first norm is not extreme, μ is capped at 1
    assert not d2.extreme and not d2.clipped and c2.mu == 1.0


def test_ema_rule_by_hand():
    c = EmaThresholdClipper(EmaClipConfig(decay=0.99, warmup_steps=0))
    c.decide(0.2)
    mu, var = 0.6, 0.0
    # below the threshold: μ moves first, then var uses the *updated* μ
    d = c.decide(0.5)
    mu = 0.99 * mu + 0.01 * 0.5
    var = 0.99 * var + 0.01 * (mu - 0.5) ** 2
    assert d.threshold == pytest.approx(0.6) and not d.clipped
    assert (c.mu, c.var) == (pytest.approx(mu, rel=1e-12), pytest.approx(var, rel=1e-12))
    assert var != pytest.approx(0.01 * (0.6 - 0.5) ** 2)  # the old-μ variant would differ
    thr = mu + 3 * math.sqrt(var)
    # above the threshold: clipped by thr/g, statistics unchanged
    d = c.decide(0.9)
    assert d.clipped and not d.extreme
    assert d.threshold == pytest.approx(thr) and d.scale == pytest.approx(thr / 0.9)
    assert (c.mu, c.var) == (pytest.approx(mu, rel=1e-12), pytest.approx(var, rel=1e-12))
    # the extreme threshold is max(μ + 5σ, 5)
    assert c.extreme_threshold() == 5.0
    d = c.decide(5.0)
    assert d.clipped and not d.extreme
    d = c.decide(5.01)
    assert d.extreme and not d.clipped and d.scale == 1.0
    assert (c.mu, c.var) == (pytest.approx(mu, rel=1e-12), pytest.approx(var, rel=1e-12))
    assert (c.steps, c.clipped_count, c.extreme_count, c.consecutive_extreme) == (5, 2, 1, 1)


def test_non_finite_is_extreme_and_too_many_stop():
    c = EmaThresholdClipper(EmaClipConfig(max_consecutive_extreme=3, warmup_steps=0))
    assert c.decide(float("nan")).extreme  # even on the first step
    assert c.mu is None
    c.decide(0.1)
    assert c.consecutive_extreme == 0
    assert c.decide(float("inf")).extreme
    assert c.decide(100.0).extreme
    with pytest.raises(TooManyExtremeStepsError, match="3 consecutive extreme"):
        c.decide(float("nan"))
    assert c.extreme_count == 4


@pytest.mark.parametrize("warmup,stop", [(0, 5), (4, 2), (4, 6)], ids=["reference", "mid-warmup", "after"])
def test_state_round_trip_continues_identically(warmup: int, stop: int):
    norms = [0.3, 0.25, 0.28, 0.9, 0.27, 30.0, 0.26, 0.31, 0.7, 0.29, 0.3, 0.28]
    config = EmaClipConfig(decay=0.9, warmup_steps=warmup)
    a = EmaThresholdClipper(config)
    for g in norms[:stop]:
        a.decide(g)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = EmaThresholdClipper(config)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.state_dict() == a.state_dict()
    decisions = [a.decide(g) for g in norms[stop:]]
    assert decisions == [b.decide(g) for g in norms[stop:]]
    assert any(d.extreme for d in decisions) or stop > 5  # the 30.0 spike after the warm-up is extreme
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({"mu": 1.0})
    with pytest.raises(ValueError, match="invalid"):
        b.load_state_dict({**a.state_dict(), "var": -1.0})


# the small preset's first gradient norms (pretrain_t2v.py, tests/training_fixtures.py set-up, lr 1e-3)
SMALL_PRESET_NORMS = [6.6878, 8.0897, 9.2416, 7.6224, 5.8163, 6.8353, 6.6220, 7.4476, 7.9406, 5.6099, 6.635]


def test_reference_rule_kills_the_small_preset():
    """Issue 20 item 7, as it was: μ = min(3g, 1) puts the extreme bound at 5, every later step is extreme."""
    c = EmaThresholdClipper(EmaClipConfig(warmup_steps=0))
    c.decide(SMALL_PRESET_NORMS[0])
    with pytest.raises(TooManyExtremeStepsError, match="10 consecutive"):
        for g in SMALL_PRESET_NORMS[1:]:
            assert c.decide(g).extreme


def test_warmup_seeds_the_statistics_clips_and_is_never_extreme():
    c = EmaThresholdClipper(EmaClipConfig(warmup_steps=10))
    first = c.decide(SMALL_PRESET_NORMS[0])
    assert not first.clipped and first.threshold == math.inf
    second = c.decide(SMALL_PRESET_NORMS[1])  # above the single norm seen so far: clipped, not extreme
    assert second.clipped and second.threshold == pytest.approx(SMALL_PRESET_NORMS[0])
    assert c.decide(float("nan")).extreme  # non-finite is extreme even in the warm-up ...
    assert c.warmup_seen == 2  # ... and stays out of the statistics
    decisions = [c.decide(g) for g in SMALL_PRESET_NORMS[2:10]]
    assert not any(d.extreme for d in decisions) and c.warmup_seen == 10
    warm = SMALL_PRESET_NORMS[:10]
    assert c.mu == pytest.approx(statistics.fmean(warm), rel=1e-12)
    assert c.var == pytest.approx(statistics.pvariance(warm), rel=1e-9)
    # after the warm-up the v1.5 rule runs from these statistics: the next norms train, a spike is extreme
    thr = c.mu + 3 * math.sqrt(c.var)
    d = c.decide(SMALL_PRESET_NORMS[10])
    assert d.threshold == pytest.approx(thr) and not d.clipped and not d.extreme and d.scale == 1.0
    assert c.decide(c.mu + 6 * math.sqrt(c.var) + 5).extreme


def test_version_1_state_loads_as_warmed_up():
    c = EmaThresholdClipper(EmaClipConfig(warmup_steps=10))
    c.load_state_dict({"version": 1, "mu": 0.5, "var": 0.01, "steps": 3, "extreme_count": 0,
                       "consecutive_extreme": 0})
    assert not c.warming_up and c.extreme_threshold() == 5.0
    c.load_state_dict({"version": 1, "mu": None, "var": 0.0, "steps": 0, "extreme_count": 0,
                       "consecutive_extreme": 0})
    assert c.warming_up
    with pytest.raises(KeyError, match="warmup_seen"):
        c.load_state_dict({k: v for k, v in c.state_dict().items() if k != "warmup_seen"})


class _FakeMegatronOptimizer:
    """The three-phase interface of megatron-core optimizers over a plain SGD (for the wrapper's logic)."""

    def __init__(self, params: list[torch.nn.Parameter], clip_grad: float = 0.0) -> None:
        self.optimizer = torch.optim.SGD(params, lr=0.5)
        self.config = SimpleNamespace(clip_grad=clip_grad, log_num_zeros_in_grad=False)
        self.inner_steps = 0

    def prepare_grads(self) -> bool:
        return False

    def get_grad_norm(self) -> float:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        return torch.cat([g.reshape(-1) for g in grads]).norm().item()

    def step_with_ready_grads(self) -> bool:
        self.optimizer.step()
        self.inner_steps += 1
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


def _set_grad(p: torch.nn.Parameter, direction: torch.Tensor, norm: float) -> None:
    p.grad = direction / direction.norm() * norm


def test_wrapper_clips_and_skips():
    p = torch.nn.Parameter(torch.zeros(6))
    fake = _FakeMegatronOptimizer([p])
    opt = AdaptiveClipOptimizer(fake, EmaThresholdClipper(REFERENCE))
    direction = torch.arange(1.0, 7.0)
    _set_grad(p, direction, 0.2)
    rec = opt.step()
    assert rec.stepped and not rec.clipped and rec.grad_norm_before == pytest.approx(0.2)
    w = p.detach().clone()
    # a spike: the update applied is lr · (thr / g) · grad, i.e. its norm is lr · thr
    _set_grad(p, direction, 3.0)
    rec = opt.step()
    assert rec.clipped and rec.threshold == pytest.approx(0.6)
    assert rec.grad_norm_after == pytest.approx(0.6) and rec.scale == pytest.approx(0.2)
    assert (w - p.detach()).norm().item() == pytest.approx(0.5 * 0.6, rel=1e-5)
    assert p.grad.norm().item() == pytest.approx(0.6, rel=1e-5)
    # an extreme step: no update at all
    w = p.detach().clone()
    _set_grad(p, direction, 1e4)
    rec = opt.step()
    assert rec.extreme and rec.skipped and not rec.stepped
    assert torch.equal(w, p.detach()) and fake.inner_steps == 2
    assert opt.clip_state_dict()["extreme_count"] == 1
    # forwarding to the wrapped optimizer
    opt.zero_grad()
    assert p.grad is None
    assert opt.step(skip_update=True).skipped and fake.inner_steps == 2


def test_clip_mode_switch_on_resume():
    """A resume may switch between constant and EMA clipping: constant -> EMA starts the EMA statistics afresh
    (a fresh clipper's state) keeping the extreme-in-a-row count; EMA -> constant keeps only that count."""
    p = torch.nn.Parameter(torch.zeros(3))
    constant = AdaptiveClipOptimizer(_FakeMegatronOptimizer([p], clip_grad=1.0))
    constant.consecutive_extreme = 2
    ema = AdaptiveClipOptimizer(_FakeMegatronOptimizer([p]), EmaThresholdClipper(REFERENCE))
    ema.load_clip_state_dict(constant.clip_state_dict())
    fresh = EmaThresholdClipper(REFERENCE).state_dict()
    assert ema.clip_state_dict() == {**fresh, "consecutive_extreme": 2}
    _set_grad(p, torch.ones(3), 0.2)
    assert ema.step().stepped
    back = AdaptiveClipOptimizer(_FakeMegatronOptimizer([p], clip_grad=1.0))
    back.load_clip_state_dict(ema.clip_state_dict())
    assert back.clip_state_dict() == {"consecutive_extreme": 0}


def test_wrapper_constant_clip_and_validation():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="clip_grad must be 0.0"):
        AdaptiveClipOptimizer(_FakeMegatronOptimizer([p], clip_grad=1.0), EmaThresholdClipper())
    with pytest.raises(TypeError, match="megatron-core optimizer"):
        AdaptiveClipOptimizer(torch.optim.SGD([p], lr=1.0))
    opt = AdaptiveClipOptimizer(_FakeMegatronOptimizer([p], clip_grad=1.0))
    _set_grad(p, torch.ones(3), 4.0)
    rec = opt.step()
    assert rec.clipped and rec.threshold == 1.0 and p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.full((3,), float("nan"))
    w = p.detach().clone()
    assert opt.step().skipped and torch.equal(w, p.detach())


def test_non_finite_loss_is_extreme_and_bounded_in_every_mode():
    """Issue 20 item 10: with constant clipping (no clipper) --max-consecutive-extreme-steps was ignored, and a
    non-finite loss with finite gradients was trained on."""
    p = torch.nn.Parameter(torch.zeros(3))
    fake = _FakeMegatronOptimizer([p], clip_grad=1.0)
    opt = AdaptiveClipOptimizer(fake, max_consecutive_extreme=3)
    _set_grad(p, torch.ones(3), 0.5)
    rec = opt.step(loss_finite=False)
    assert rec.extreme and rec.skipped and fake.inner_steps == 0 and rec.grad_norm_before == pytest.approx(0.5)
    assert opt.step().stepped and opt.clip_state_dict() == {"consecutive_extreme": 0}
    p.grad = torch.full((3,), float("inf"))
    assert opt.step().extreme and opt.step(loss_finite=False).extreme
    # the streak survives a checkpoint: the resumed optimizer stops at the third in a row
    resumed = AdaptiveClipOptimizer(_FakeMegatronOptimizer([p], clip_grad=1.0), max_consecutive_extreme=3)
    resumed.load_clip_state_dict(opt.clip_state_dict())
    with pytest.raises(TooManyExtremeStepsError, match="3 consecutive non-finite steps"):
        resumed.step()
    # with the EMA clipper the loss flag reaches the clipper as a non-finite norm
    q = torch.nn.Parameter(torch.zeros(3))
    ema = AdaptiveClipOptimizer(_FakeMegatronOptimizer([q]), EmaThresholdClipper(REFERENCE))
    _set_grad(q, torch.ones(3), 0.5)
    rec = ema.step(loss_finite=False)
    assert rec.extreme and rec.skipped and ema.clip_state_dict()["consecutive_extreme"] == 1


# ---- the real megatron-core distributed optimizer, TP = 2 × DP = 2 ----------------------------------------

PLAN = ["normal", "normal", "normal", "normal", "spike", "normal", "extreme", "nan", "normal"]
NORMS = {"spike": 3.0, "extreme": 1000.0}


def _clip_run(tp: int) -> dict:
    from megatron.core import parallel_state as mpu

    from megatron_video.optim import OptimizerOptions, build_optimizer
    from megatron_video.parallel import initialize_parallel
    from tests.test_optim_helpers import (
        HIDDEN,
        SEQ,
        backward,
        build_model,
        full_params,
        full_weights,
        local_batch,
        reference_grads,
    )

    initialize_parallel(tensor_model_parallel_size=tp)
    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    weights = full_weights(0)
    model = build_model(tp, weights)
    options = OptimizerOptions(lr=1e-2, weight_decay=0.1, adam_eps=1e-8, precision="fp32", clip_ema_decay=0.9,
                               clip_warmup_steps=0)
    opt = build_optimizer([model], options)

    # One-process reference: the full model, torch AdamW with megatron's weight-decay grouping, the same rule.
    ref = {k: v.clone() for k, v in weights.items()}
    decayed = ["fc1.weight", "fc2.weight"]
    ref_opt = torch.optim.AdamW(
        [{"params": [ref[k] for k in decayed], "weight_decay": 0.1},
         {"params": [ref[k] for k in ref if k not in decayed], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    ref_clip = EmaThresholdClipper(EmaClipConfig(decay=0.9, warmup_steps=0))

    gen = torch.Generator().manual_seed(1)
    steps = []
    for i, kind in enumerate(PLAN):
        x = torch.randn(SEQ, 4, HIDDEN, generator=gen)
        target = torch.randn(SEQ, 4, HIDDEN, generator=gen)
        if kind == "nan":
            target[0, 0, 0] = float("nan")
        base = reference_grads(ref, x, target, 1.0)
        base_norm = torch.sqrt(sum(g.square().sum() for g in base.values())).item()
        # Engineer the gradient norm exactly through the loss factor (grads are linear in it).
        factor = 1.0 if kind == "nan" else NORMS.get(kind, 0.2 + 0.02 * (i % 3)) / base_norm
        for chunk in [model]:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        backward(model, local_batch(x, dp, dp_rank), local_batch(target, dp, dp_rank), factor)
        before = full_params(model, tp)
        rec = opt.prepare_and_clip()
        applied_norm = float(opt.get_grad_norm())  # norm of the main grads the optimizer will use
        rec = opt.apply_update(rec)
        after = full_params(model, tp)

        expected = ref_clip.decide(base_norm * factor)
        if not expected.extreme:
            for k, p in ref.items():
                p.grad = base[k] * factor * expected.scale
            ref_opt.step()
        steps.append({
            "kind": kind, "record": rec.as_dict(), "expected_norm": base_norm * factor,
            "expected_threshold": expected.threshold, "applied_norm": applied_norm,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "param_err": max((after[k] - ref[k]).abs().max().item() for k in ref),
        })
    buf = io.BytesIO()
    torch.save(opt.clip_state_dict(), buf)
    buf.seek(0)
    restored = EmaThresholdClipper(EmaClipConfig(decay=0.9, warmup_steps=0))
    restored.load_state_dict(torch.load(buf, weights_only=True))
    return {"steps": steps, "state": opt.clip_state_dict(), "restored": restored.state_dict(),
            "ref_state": ref_clip.state_dict()}


@pytest.mark.slow
def test_clip_with_megatron_distributed_optimizer_tp2_dp2():
    results = run_distributed(_clip_run, 4, 2)
    for res in results:
        for step in res["steps"]:
            rec = step["record"]
            # megatron's norm over the sharded main grads = the full model's norm (TP duplicates once)
            if step["kind"] != "nan":
                assert rec["grad_norm_before"] == pytest.approx(step["expected_norm"], rel=1e-5)
            if step["kind"] == "spike":
                assert rec["clipped"] and not rec["skipped"]
                assert rec["threshold"] == pytest.approx(step["expected_threshold"], rel=1e-5)
                assert rec["threshold"] < step["expected_norm"]
                # the clip really scaled the grads Adam steps with: their norm is the threshold
                assert step["applied_norm"] == pytest.approx(rec["threshold"], rel=1e-5)
                assert rec["grad_norm_after"] == pytest.approx(rec["threshold"], rel=1e-9)
            elif step["kind"] in ("extreme", "nan"):
                assert rec["extreme"] and rec["skipped"] and not rec["clipped"]
                assert step["unchanged"], "a skipped step must leave the weights bit-identical"
            else:
                assert not rec["clipped"] and not rec["skipped"]
                assert not step["unchanged"]
            # every step (including the skipped ones) matches the one-process reference
            assert step["param_err"] < 1e-5, step
        # fp32 norms agree with the reference to round-off, so the statistics do too
        assert res["state"] == pytest.approx(res["ref_state"], rel=1e-5)
        assert res["state"]["extreme_count"] == 2 and res["state"]["clipped_count"] == 1
        assert res["restored"] == res["state"]
    # every rank took the same decisions
    assert all(r["state"] == results[0]["state"] for r in results)
