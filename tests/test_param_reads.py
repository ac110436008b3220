"""No forward reads a trainable parameter before its own module is called (tests/param_reads.py says why: with
--overlap-param-gather it would compute with the previous step's weights outside this rank's shard). The SUV
denoiser and the structure controller on it, at TP = 1 here and under TP2 + Megatron-SP and CP2 (slow). The
structure controller had two such reads until 2026-12-05: its first convolution's weights (read by
`fold_to_latent_grid`) and, at TP = 1, the projectors' (read by one F.linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.harness import run_distributed
from tests.param_reads import EarlyParameterReads
from tests.test_control import _batch, _controlled


def _reads(model: torch.nn.Module, batch: dict, controlled: bool) -> set[tuple[str, str]]:
    batch = dict(batch)
    batch.pop("target")
    structure = batch.pop("structure")
    with EarlyParameterReads(model) as reads:
        model(**batch, **({"structure": structure} if controlled else {}))
    return reads.reads


def test_the_check_finds_a_weight_read_without_its_module():
    class ReadsChildWeight(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.outer = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.outer(F.linear(x, self.inner.weight) + self.inner.bias.dtype.itemsize)

    model = ReadsChildWeight()
    with EarlyParameterReads(model) as reads:
        model(torch.ones(2, 3))
    assert reads.reads == {("inner.weight", "linear")}, reads.reads  # not the bias: only its dtype was read
    with EarlyParameterReads(model) as reads:
        model.outer(model.inner(torch.ones(2, 3)))
    assert reads.reads == set()


@pytest.mark.parametrize("stage_order", [True, False])
def test_denoiser_and_controller_read_weights_only_through_their_modules(tp1, stage_order):
    from megatron_video.models.suv_mmdit import megatron_config, suv_config

    cfg = suv_config("small")
    config = megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True)
    for width in (None, 32):
        model = _controlled(cfg, config, width=width)
        model.base.use_stage_order(stage_order)
        for p in model.base.parameters():  # trained alone, the denoiser's own weights count as well
            p.requires_grad_(True)
        assert _reads(model.base, _batch(cfg), controlled=False) == set()
        for p in model.base.parameters():
            p.requires_grad_(False)
        assert _reads(model, _batch(cfg), controlled=True) == set()


def parallel_reads_worker() -> list[set[tuple[str, str]]]:
    from megatron_video.models.suv_mmdit import megatron_config, suv_config
    from megatron_video.parallel import initialize_parallel

    cfg = suv_config("small")
    out = []
    for tp, cp, sp in ((2, 1, True), (1, 2, False)):
        initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        config = megatron_config(cfg, tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp,
                                 params_dtype=torch.float32, use_cpu_initialization=True)
        model = _controlled(cfg, config, width=32)
        for p in model.base.parameters():
            p.requires_grad_(True)
        out.append(_reads(model, _batch(cfg), controlled=True))
    return out


@pytest.mark.slow
def test_no_early_reads_under_tensor_sequence_and_context_parallelism():
    for rank_reads in run_distributed(parallel_reads_worker, 2, timeout=600):
        assert rank_reads == [set(), set()], rank_reads


def test_inpainting_denoiser_reads_weights_only_through_its_modules(tp1):
    from tests.test_inpaint_model import I2V, build, inputs

    model = build(I2V)
    with EarlyParameterReads(model) as reads:
        model(**inputs(I2V))
    assert reads.reads == set()
