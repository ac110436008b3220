"""The denoiser is allocated and initialised on the rank's device, with initial values that depend on --seed only.

Placement: on CPU every device is the host, so the rank's device is taken to be `meta`; a model built on the host
and moved afterwards has its parameters on `cpu` while it is built. Layout: TP 2 x PP 2 builds the same initial
weights as one rank, exactly (each TP rank keeps its slice of the same master weight; every block is seeded by its
index, so a stage's blocks do not depend on what earlier stages drew)."""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.harness import run_distributed


def _args(tp: int, pp: int) -> argparse.Namespace:
    return argparse.Namespace(
        seed=1234, bf16=False, fp16=False, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=1, sequence_parallel=False, pipeline_layer_split=None, recompute_granularity=None,
        recompute_method=None, recompute_num_layers=None,
    )


def _build(tp: int, pp: int, device: str | None = None) -> dict[str, object]:
    from megatron.core import parallel_state as mpu

    import megatron_video.parallel.initialize as initialize
    from megatron_video.models.registry import model_config_from_mapping
    from megatron_video.parallel import initialize_parallel, set_seed
    from megatron_video.training.components import build_denoiser

    initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    set_seed(1234)
    if device is not None:
        initialize.local_device = lambda: torch.device(device)
    module, _ = build_denoiser(_args(tp, pp), model_config_from_mapping({"preset": "small"}))
    return {
        "tp_rank": mpu.get_tensor_model_parallel_rank(),
        "devices": sorted({p.device.type for p in module.parameters()}),
        "params": {} if device == "meta" else {
            name: (p.detach().clone(), getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False)
                   else -1)
            for name, p in module.named_parameters()},
    }


@pytest.mark.slow
def test_denoiser_is_built_on_the_device():
    assert run_distributed(_build, 1, 1, 1, "meta")[0]["devices"] == ["meta"]


@pytest.mark.slow
def test_initial_weights_do_not_depend_on_the_layout():
    whole = run_distributed(_build, 1, 1, 1)[0]["params"]
    ranks = run_distributed(_build, 4, 2, 2)
    seen = set()
    for rank in ranks:
        for name, (value, dim) in rank["params"].items():
            expected = whole[name][0] if dim < 0 else whole[name][0].chunk(2, dim)[rank["tp_rank"]]
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=f"{name} on TP rank {rank['tp_rank']}")
            seen.add(name)
    assert seen == set(whole), "every parameter lives on some pipeline stage"
