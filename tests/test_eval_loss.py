"""Evaluation loss (Open-Sora 1.3 style): fixed levels and noise, per bucket, and the same number under every
TP / CP / PP / DP layout as on one rank.

Tolerance: per-sample losses are sums of squares of the model output, which TP / CP / PP compute with another
fp32 reduction order (rtol 1e-5 covers that, as the TP / PP equivalence tests); the float64 DP sum adds nothing.
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.diffusion import RectifiedFlow, VPrediction
from megatron_video.evaluation import bucket_name, eval_levels, eval_noise
from tests.harness import run_distributed

GLOBAL_BATCH = 4
# (latent T, H, W), text length, bucket: two global batches of one bucket, one of another
BATCHES = [((2, 4, 4), 5, "9x32x32"), ((1, 4, 6), 5, "image_32x48"), ((2, 4, 4), 5, "9x32x32")]
# (tp, cp, pp, sequence_parallel) at world size 4; DP fills the rest
LAYOUTS = [(2, 1, 1, True), (1, 2, 2, False), (1, 1, 2, False)]


def test_levels_noise_and_names():
    assert eval_levels(10) == pytest.approx([i / 11 for i in range(1, 11)])
    x0 = torch.zeros(2, 4, 2, 3, 3)
    a, b = eval_noise(x0, [5, 6], seed=1), eval_noise(x0[:1], [6], seed=1)
    assert torch.equal(a[1:], b), "a sample's noise depends on its position only"
    assert not torch.equal(a[0], a[1])
    assert bucket_name((1, 288, 512)) == "image_288x512" and bucket_name((57, 288, 512)) == "57x288x512"


def test_objectives_at_level():
    x0, noise = torch.randn(2, 4, 2, 3, 3), torch.randn(2, 4, 2, 3, 3)
    s = RectifiedFlow().at_level(x0, noise, 0.25)
    torch.testing.assert_close(s.x_t, 0.25 * noise + 0.75 * x0)
    torch.testing.assert_close(s.target, noise - x0)
    assert s.timestep.tolist() == [250.0, 250.0]
    v = VPrediction().at_level(x0, noise, 1.0)  # zero terminal SNR: pure noise, target -x0
    torch.testing.assert_close(v.x_t, noise, atol=1e-6, rtol=0)
    torch.testing.assert_close(v.target, -x0, atol=1e-6, rtol=0)


def _global_batches(cfg) -> list[list[dict]]:
    """Every global batch as GLOBAL_BATCH single-sample rows (identical on all ranks)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for (t, h, w), text_len, _ in BATCHES:
        rows = []
        for _ in range(GLOBAL_BATCH):
            mask = torch.ones(1, text_len, dtype=torch.bool)
            mask[0, text_len - 1] = bool(torch.rand(1, generator=g) < 0.5)
            rows.append({"x0": torch.randn(1, cfg.in_channels, t, h, w, generator=g),
                         "t5_hidden": torch.randn(1, text_len, cfg.caption_channels, generator=g),
                         "t5_mask": mask, "clip_pooled": torch.randn(1, cfg.pooled_projection_dim, generator=g)})
        out.append(rows)
    return out


def model_at_layout(cfg, weights: dict, tp: int, cp: int, pp: int, sp: bool):
    """This rank's part of the SUV model at TP x CP x PP (groups rebuilt), holding the released-name `weights`."""
    from megatron.core import parallel_state as mpu

    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.pipeline import stage_of
    from megatron_video.models.suv_mmdit.state_dict_adapter import from_released, shard_released
    from megatron_video.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
    config = megatron_config(cfg, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             context_parallel_size=cp, sequence_parallel=sp, params_dtype=torch.float32,
                             pipeline_dtype=torch.float32, use_cpu_initialization=True)
    model = SUVMMDiT(cfg, config, stage_of(cfg, pp, mpu.get_pipeline_model_parallel_rank()))
    ours = from_released(shard_released(weights, tp, mpu.get_tensor_model_parallel_rank()), cfg)
    model.load_state_dict({k: v for k, v in ours.items() if k in model.state_dict()}, strict=True)
    return model


def eval_worker(cfg, layouts) -> list[dict]:
    from megatron.core import parallel_state as mpu

    from megatron_video.evaluation import EvalBatch, evaluate_batches
    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.parallel import initialize_parallel, set_seed
    from megatron_video.training.loop import global_positions, t2v_inputs
    from tests.test_suv_tp import random_released_weights

    initialize_parallel()
    set_seed(0)
    weights = random_released_weights(SUVMMDiT(cfg, megatron_config(cfg, use_cpu_initialization=True)))
    data = _global_batches(cfg)
    results = []
    for layout in layouts:
        model = model_at_layout(cfg, weights, *layout)
        dp_rank, dp = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
        micro = 1 if dp > 1 else 2  # two micro-batch sizes across the layouts
        num_micro = GLOBAL_BATCH // (micro * dp)
        batches = []
        for index, rows in enumerate(data):
            mbs = []
            for m in range(num_micro):
                positions = global_positions(m, micro, dp_rank, dp)
                mb = {key: torch.cat([rows[p][key] for p in positions]) for key in rows[0]}
                mb["positions"] = [index * GLOBAL_BATCH + p for p in positions]
                mbs.append(mb)
            batches.append(EvalBatch(BATCHES[index][2], mbs))
        result = evaluate_batches(model, model, RectifiedFlow(), batches, t2v_inputs, micro, num_timesteps=3, seed=7)
        results.append(dataclass_dict(result))
    return results


def dataclass_dict(result) -> dict:
    return {"per_bucket": result.per_bucket, "per_level": result.per_level, "overall": result.overall,
            "samples": result.samples}


@pytest.mark.slow
def test_eval_loss_same_under_every_layout():
    from megatron_video.models.suv_mmdit import suv_config

    cfg = suv_config("small", caption_channels=16, pooled_projection_dim=8)
    (reference,) = run_distributed(eval_worker, 1, cfg, [(1, 1, 1, False)], timeout=300)[0]
    assert reference["samples"] == {"9x32x32": 8, "image_32x48": 4}
    assert set(reference["per_bucket"]) == {"9x32x32", "image_32x48"} and len(reference["per_level"]) == 3
    assert reference["per_level"][0] != reference["per_level"][2]
    per_rank = run_distributed(eval_worker, 4, cfg, LAYOUTS, timeout=600)
    for i, layout in enumerate(LAYOUTS):
        for rank, results in enumerate(per_rank):  # every rank holds the full result
            got = results[i]
            assert got["samples"] == reference["samples"], (layout, rank)
            expect = [reference["overall"], *reference["per_level"], *reference["per_bucket"].values()]
            values = [got["overall"], *got["per_level"], *[got["per_bucket"][k] for k in reference["per_bucket"]]]
            torch.testing.assert_close(torch.tensor(values), torch.tensor(expect), rtol=1e-5, atol=0,
                                       msg=f"layout (tp, cp, pp, sp) = {layout}, rank {rank}")
