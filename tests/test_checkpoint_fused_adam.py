"""Resume with TransformerEngine's / apex's FusedAdam, which megatron picks whenever either is installed.

FusedAdam's contract (TransformerEngine `transformer_engine/pytorch/optimizers/fused_adam.py`, commit 04912bf):
the per-parameter state holds only `exp_avg`, `exp_avg_sq` (and `master_param`); `state_dict()` passes every state
key through `get_unscaled_state(param, name)` and `load_state_dict()` through `set_scaled_state(param, name, ...)`,
both of which look the key up in `name_to_dtype_map` (exactly those three names), and `step()` counts steps in
`group["step"]`, not in the state (apex `apex/optimizers/fused_adam.py` keeps `group['step']` likewise). The
stand-in below honours that contract; megatron is told TE is present the way its imports would set it
(`Adam` / `USING_PYTORCH_OPTIMIZER` in `megatron.core.optimizer`, `Adam` / `HAVE_APEX_OR_TE` /
`USING_TE_OPTIMIZER` in `megatron.core.optimizer.distrib_optimizer`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed


class FusedAdamStandIn(torch.optim.Optimizer):
    """AdamW with TE FusedAdam's state layout and state_dict contract (see module docstring)."""

    name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master_param": torch.float32}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True,
                 bias_correction=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction))
        self.adam_w_mode = adam_w_mode

    def _checked(self, name: str) -> str:
        self.name_to_dtype_map[name]  # TE: KeyError for anything but its three state names
        return name

    def state_dict(self):
        state_dict = super().state_dict()
        for entry in state_dict["state"].values():
            for name in entry:
                self._checked(name)
        return state_dict

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for entry in self.state.values():
            for name in list(entry):
                entry[self._checked(name)] = entry[name].float()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (state["exp_avg_sq"] / (1 - beta2 ** group["step"])).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** group["step"]))


def _pretend_transformer_engine() -> None:
    import megatron.core.optimizer as optimizer_module
    from megatron.core.optimizer import distrib_optimizer

    optimizer_module.Adam = FusedAdamStandIn
    optimizer_module.USING_PYTORCH_OPTIMIZER = False
    distrib_optimizer.Adam = FusedAdamStandIn
    distrib_optimizer.HAVE_APEX_OR_TE = True
    distrib_optimizer.USING_TE_OPTIMIZER = True


def _state(opt) -> dict:
    inner = opt.optimizer.optimizer
    moments = [inner.state[p]["exp_avg"].clone() for g in inner.param_groups for p in g["params"]]
    return {"steps": sorted({g.get("step") for g in inner.param_groups}), "exp_avg": moments,
            "keys": sorted({k for s in inner.state.values() for k in s})}


def _run(directory: str, phase: str) -> dict:
    from megatron_video.optim import OptimizerOptions, build_optimizer
    from megatron_video.parallel import initialize_parallel
    from megatron_video.training.checkpoint_state import load_optimizer_state, optimizer_sharded_state
    from megatron_video.training.checkpointing import load_checkpoint, model_sharded_state_dict, save_checkpoint
    from megatron_video.training.components import materialize_optimizer_state
    from tests.test_optim_helpers import HIDDEN, SEQ, backward, build_model, full_weights

    _pretend_transformer_engine()
    initialize_parallel()  # 2 ranks: DP = 2
    model = build_model(1, full_weights(3))
    opt = build_optimizer([model], OptimizerOptions(lr=1e-2, precision="fp32", clip_mode="none"))
    assert isinstance(opt.optimizer.optimizer, FusedAdamStandIn)
    module = model.module

    def sharded(loading: bool) -> dict:
        model_sd = model_sharded_state_dict(module)
        return {"model": model_sd, "optimizer": optimizer_sharded_state(opt, model_sd, loading)}

    if phase == "save":
        gen = torch.Generator().manual_seed(0)
        rank = torch.distributed.get_rank()
        for _ in range(2):
            x, target = torch.randn(SEQ, 2, HIDDEN, generator=gen), torch.randn(SEQ, 2, HIDDEN, generator=gen)
            model.zero_grad_buffer()
            opt.zero_grad()
            backward(model, x[:, rank:rank + 1], target[:, rank:rank + 1], 1.0)
            assert opt.step().stepped
        save_checkpoint(directory, 2, sharded(False), {"world_size": 2})
        return _state(opt)
    materialize_optimizer_state(opt)
    _, loaded, _ = load_checkpoint(directory, lambda: sharded(True))
    load_optimizer_state(opt, loaded["optimizer"], model_sharded_state_dict(module))
    return _state(opt)


@pytest.mark.slow
def test_resume_with_fused_adam(tmp_path: Path):
    saved = run_distributed(_run, 2, str(tmp_path), "save")
    loaded = run_distributed(_run, 2, str(tmp_path), "load")
    for before, after in zip(saved, loaded, strict=True):
        assert after["keys"] == ["exp_avg", "exp_avg_sq"]  # no "step" in FusedAdam's state
        assert after["steps"] == before["steps"] == [2]
        assert all(torch.equal(a, b) for a, b in zip(before["exp_avg"], after["exp_avg"], strict=True))
        assert any(float(t.abs().max()) > 0 for t in after["exp_avg"]) and not math.isnan(after["steps"][0])
