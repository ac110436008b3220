"""Optimizer construction: option validation, the megatron config, weight-decay groups, clip modes."""

from __future__ import annotations

import pytest
import torch

from megatron_video.optim import EmaThresholdClipper, OptimizerOptions, build_clipper, optimizer_config
from tests.harness import run_distributed


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "fp8"}, "precision"),
    ({"optimizer": "lion"}, "optimizer"),
    ({"optimizer": "sgd"}, "distributed optimizer supports Adam only"),
    ({"clip_mode": "constant", "clip_grad": 0.0}, "clip_grad > 0"),
    ({"clip_mode": "sometimes"}, "clip_mode"),
    ({"loss_scale": 1024.0}, "fp16"),
    ({"lr": 1e-4, "min_lr": 1e-3}, "min_lr"),
    ({"clip_ema_decay": 1.0}, "decay"),
    ({"adam_beta2": 1.0}, "betas"),
])
def test_options_rejected_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerOptions(**kwargs)


def test_megatron_config_and_clipper():
    cfg = optimizer_config(OptimizerOptions())
    assert cfg.bf16 and not cfg.fp16 and cfg.params_dtype == torch.bfloat16
    assert cfg.use_distributed_optimizer and cfg.clip_grad == 0.0  # the adaptive clip replaces megatron's
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay) == (0.9, 0.999, 1e-15, 1e-4)
    assert cfg.decoupled_weight_decay  # AdamW
    const = optimizer_config(OptimizerOptions(clip_mode="constant", clip_grad=2.0, precision="fp16"))
    assert const.clip_grad == 2.0 and const.fp16 and const.params_dtype == torch.float16
    clipper = build_clipper(OptimizerOptions(clip_ema_decay=0.95, max_consecutive_extreme=3))
    assert isinstance(clipper, EmaThresholdClipper)
    assert clipper.config.decay == 0.95 and clipper.config.max_consecutive_extreme == 3
    assert build_clipper(OptimizerOptions(clip_mode="none")) is None


def _build_run() -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_video.optim import build_optimizer
    from megatron_video.optim.adaptive_optimizer import leaf_optimizers
    from megatron_video.parallel import initialize_parallel
    from tests.test_optim_helpers import HIDDEN, SEQ, backward, build_model, full_weights

    initialize_parallel()
    out: dict = {}
    model = build_model(1, full_weights(0), use_distributed_optimizer=False)
    opt = build_optimizer([model], OptimizerOptions(precision="fp32", use_distributed_optimizer=False,
                                                    weight_decay=0.3, clip_mode="constant", clip_grad=1e-3))
    names = {p: n for n, p in model.module.named_parameters()}
    out["wd"] = {names[p]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    out["kernel"] = {(g["fused"], g["foreach"]) for leaf in leaf_optimizers(opt.optimizer)
                     for g in leaf.optimizer.param_groups}
    backward(model, torch.randn(SEQ, 2, HIDDEN), torch.randn(SEQ, 2, HIDDEN), 1.0)
    rec = opt.prepare_and_clip()
    out["constant"] = (rec.clipped, rec.threshold, float(opt.get_grad_norm()))
    opt.apply_update(rec)
    try:
        # the DDP wrapper was built without the distributed optimizer
        build_optimizer([model], OptimizerOptions(precision="fp32"))
    except ValueError as exc:
        out["mismatch"] = str(exc)
    overlap_config = DistributedDataParallelConfig(overlap_grad_reduce=True, use_distributed_optimizer=False)
    overlapped = DistributedDataParallel(
        model.config, overlap_config, build_model(1, full_weights(0), use_distributed_optimizer=False).module)
    try:
        build_optimizer([overlapped], OptimizerOptions(precision="fp32", use_distributed_optimizer=False,
                                                       clip_mode="rank_discard"))
    except ValueError as exc:
        out["overlap"] = str(exc)
    try:
        build_optimizer([model.module], OptimizerOptions(precision="fp32"))
    except TypeError as exc:
        out["unwrapped"] = str(exc)
    return out


@pytest.mark.slow
def test_build_weight_decay_groups_and_constant_clip():
    (res,) = run_distributed(_build_run, 1)
    # megatron's default grouping: no decay for biases and 1-D parameters
    assert res["wd"] == {"fc1.weight": 0.3, "fc2.weight": 0.3, "fc1.bias": 0.0, "fc2.bias": 0.0, "scale": 0.0}
    assert res["kernel"] == {(True, False)}  # torch AdamW on host parameters: its fused kernel
    clipped, threshold, applied = res["constant"]
    assert clipped and threshold == 1e-3 and applied == pytest.approx(1e-3, rel=1e-5)
    assert "use_distributed_optimizer" in res["mismatch"]
    assert "overlap_grad_reduce=False" in res["overlap"]
    assert "DistributedDataParallel" in res["unwrapped"]


def _fp16_overflow_run() -> list[dict]:
    from megatron.core.distributed import finalize_model_grads

    from megatron_video.optim import build_optimizer
    from megatron_video.parallel import initialize_parallel
    from tests.test_optim_helpers import HIDDEN, SEQ, build_model, full_weights

    initialize_parallel()
    model = build_model(1, full_weights(0), dtype=torch.float16)
    opt = build_optimizer([model], OptimizerOptions(precision="fp16"))
    gen = torch.Generator().manual_seed(0)
    out = []
    for factor in (1.0, 1e30, 1.0):  # the middle step overflows fp16
        model.zero_grad_buffer()
        opt.zero_grad()
        x, target = torch.randn(SEQ, 2, HIDDEN, generator=gen), torch.randn(SEQ, 2, HIDDEN, generator=gen)
        opt.scale_loss((model(x.half()) - target.half()).float().square().mean() * factor).backward()
        finalize_model_grads([model])
        before = [p.detach().clone() for p in model.parameters()]
        rec = opt.step()
        out.append({"record": rec.as_dict(), "clip": opt.clip_state_dict(),
                    "unchanged": all(torch.equal(a, b) for a, b in zip(before, model.parameters()))})
    return out


@pytest.mark.slow
def test_fp16_overflow_skips_without_touching_clip_statistics():
    first, overflow, last = run_distributed(_fp16_overflow_run, 1)[0]
    assert not first["record"]["skipped"] and not first["record"]["overflow"]
    assert overflow["record"]["overflow"] and overflow["record"]["skipped"] and not overflow["record"]["extreme"]
    assert overflow["unchanged"] and not first["unchanged"] and not last["unchanged"]
    assert overflow["clip"] == first["clip"]  # an fp16 overflow is not an extreme step
    assert last["clip"]["steps"] == 2 and last["clip"]["extreme_count"] == 0


class _Leaf:
    """The shape of a megatron optimizer to `leaf_optimizers`: the inner torch optimizer as `.optimizer`."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.optimizer = inner


def _adamw_steps(foreach: bool | None, switch: bool) -> list[torch.Tensor]:
    from megatron_video.optim.builder import use_fast_host_kernels

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(16, 8), (8,), (3, 5, 7), (1,), (4099,)]]
    inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=foreach)
    if switch:
        use_fast_host_kernels(_Leaf(inner))
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        inner.step()
    return [p.detach() for p in params]


def test_host_adam_takes_the_fused_kernel_with_the_same_updates():
    from megatron_video.optim.builder import use_fast_host_kernels

    params = [torch.nn.Parameter(torch.zeros(4))]
    unset = torch.optim.AdamW(params)
    assert unset.param_groups[0]["fused"] is None  # torch's per-tensor loop on CPU
    assert use_fast_host_kernels(_Leaf(unset)) == 1
    assert (unset.param_groups[0]["fused"], unset.param_groups[0]["foreach"]) == (True, False)
    assert use_fast_host_kernels(_Leaf(unset)) == 0  # already fused
    chosen = torch.optim.AdamW(params, fused=False)  # an explicit choice is kept
    assert use_fast_host_kernels(_Leaf(chosen)) == 0 and chosen.param_groups[0]["fused"] is False
    # loading restores the saved group options: a state saved on the multi-tensor path (older checkpoints)
    # moves to the fused kernel when resume switches again
    unset.load_state_dict(torch.optim.AdamW(params, foreach=True).state_dict())
    assert unset.param_groups[0]["fused"] is None and use_fast_host_kernels(_Leaf(unset)) == 1
    assert (unset.param_groups[0]["fused"], unset.param_groups[0]["foreach"]) == (True, False)
    sgd = torch.optim.SGD(params, lr=0.1)  # other optimizers: the multi-tensor path
    assert use_fast_host_kernels(_Leaf(sgd)) == 1 and sgd.param_groups[0]["foreach"] is True
    # the per-tensor loop's formula, rounded differently in single elements: after 4 steps at lr 1e-2 the
    # parameters differ by at most 1.2e-7 (measured); the wrong eps (1e-6), betas (0.8) or weight-decay coupling
    # move them by 8e-4 to 4e-2, and AMSGrad by 8e-6
    for a, b in zip(_adamw_steps(None, switch=True), _adamw_steps(False, switch=False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
