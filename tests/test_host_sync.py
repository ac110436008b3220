"""No device -> host synchronisation inside the SUV model during a training forward + backward (after the
first micro-batch of a shape, which builds the per-shape index maps), at TP2 + SP, CP2 and PP2, with text
padding, masked latents and a token count that needs skiparse / CP padding. Counted with
`training.host_sync.HostSyncCounter` (aten._local_scalar_dense, data-dependent sizes, tolist)."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

VARIANTS = [(2, 1, 1, True), (1, 2, 1, False), (1, 1, 2, False)]  # (TP, CP, PP, sequence parallel)


def _forward_step(data_iterator, model):
    batch = dict(next(data_iterator))
    target = batch.pop("target")
    output = model(**batch)
    return output, lambda out: ((out.float() - target).pow(2).mean(), {})


def sync_worker(variants) -> list[dict]:
    from megatron.core import parallel_state as mpu

    from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.pipeline import stage_of
    from megatron_video.parallel import initialize_parallel, set_seed
    from megatron_video.parallel.pipeline import run_forward_backward
    from megatron_video.training.host_sync import HostSyncCounter
    from tests.cp_fixtures import SHAPES, make_inputs

    cfg = suv_config("small")
    out = []
    for tp, cp, pp, sp in variants:
        initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp)
        set_seed(0)
        config = megatron_config(cfg, tensor_model_parallel_size=tp, context_parallel_size=cp,
                                 pipeline_model_parallel_size=pp, sequence_parallel=sp, params_dtype=torch.float32,
                                 pipeline_dtype=torch.float32, use_cpu_initialization=True)
        model = SUVMMDiT(cfg, config, stage_of(cfg, pp, mpu.get_pipeline_model_parallel_rank()))
        config.no_sync_func = None
        batch = make_inputs(cfg, SHAPES["ragged"])
        recv, send = model.pipeline_shapes(2, SHAPES["ragged"], batch["encoder_hidden_states"].shape[2])
        counts = []
        for _ in range(2):  # the first micro-batch of a shape may build (and cache) index maps
            with HostSyncCounter() as syncs:
                run_forward_backward(_forward_step, iter([batch]), model, 1, 2, recv, send)
            counts.append(dict(syncs.counts))
        out.append({"variant": (tp, cp, pp, sp), "counts": counts})
    return out


@pytest.mark.slow
def test_no_host_sync_in_training_step():
    for rank, records in enumerate(run_distributed(sync_worker, 2, VARIANTS, timeout=600)):
        for record in records:
            assert record["counts"][1] == {}, f"rank {rank} TP,CP,PP,SP={record['variant']}: {record['counts'][1]}"


def test_rope_built_once_per_shape_dtype_device():
    from megatron_video.models.suv_mmdit.rope import rope_cos_sin

    with torch.inference_mode():  # a first build under inference mode still serves training
        first = rope_cos_sin((2, 3, 4), 16, 10000.0)
    assert not first[0].is_inference()
    again = rope_cos_sin((2, 3, 4), 16, 10000, torch.device("cpu"))
    assert again[0] is first[0] and again[1] is first[1]
    other = rope_cos_sin((2, 3, 4), 16, 10000.0, dtype=torch.bfloat16)
    assert other[0].dtype == torch.bfloat16 and other[0] is not first[0]
    torch.testing.assert_close(other[0].float(), first[0], atol=1e-2, rtol=0)
    assert rope_cos_sin((2, 3, 5), 16, 10000.0)[0].shape == (30, 16)
