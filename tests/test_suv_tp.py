"""Tensor parallelism (TP = 2, 4, with and without Megatron sequence parallel) equals TP = 1 on CPU/gloo:
outputs, gathered gradients, and equal gradients of the replicated parameters across TP ranks after
megatron-core's finalize_model_grads (DDP + `param.sequence_parallel` all-reduce)."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

FULL = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
SELECTIVE = {"recompute_granularity": "selective"}
# (tp, sequence_parallel, megatron recompute flags); the first (TP = 1) is the reference
VARIANTS = [(1, False, {}), (2, False, {}), (2, True, {}), (4, False, {}), (4, True, {}), (2, True, FULL),
            (4, True, SELECTIVE)]


def _inputs(cfg, seed: int = 1) -> dict[str, torch.Tensor]:
    """Batch 2, latent 3 x 6 x 4 (18 tokens: skiparse pads for k = 4, SP pads for TP = 4), text 7 with padding."""
    from tests.cp_fixtures import make_inputs

    inputs = make_inputs(cfg, (3, 6, 4), seed)
    del inputs["target"]  # drawn last, so the model inputs are the same draws
    return inputs


def random_released_weights(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-trivial weights for every parameter of a TP = 1 `model`, in released names."""
    from megatron_video.models.suv_mmdit.state_dict_adapter import to_released

    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in to_released(model.state_dict(), model.cfg).items():
        if value is None:
            continue
        is_norm_weight = value.dim() == 1 and key.endswith(".weight") and "norm" in key
        out[key] = (1.0 if is_norm_weight else 0.0) + 0.3 * torch.randn(value.shape, generator=g)
    return out


def tp_worker(cfg, inputs, variants) -> list[dict]:
    """On every rank: for each (tp, sequence_parallel, recompute flags) (the first must be TP = 1, which draws
    the weights),
    build the model, load this rank's shard of the weights, run forward + backward of a fixed loss through
    megatron DDP, finalize the grads, and report."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.state_dict_adapter import load_released, to_released
    from megatron_video.parallel import initialize_parallel

    results, weights = [], None
    for tp, sp, recompute in variants:
        initialize_parallel(tensor_model_parallel_size=tp)
        config = megatron_config(cfg, tensor_model_parallel_size=tp, sequence_parallel=sp,
                                 params_dtype=torch.float32, use_cpu_initialization=True, **recompute)
        model = SUVMMDiT(cfg, config)
        if weights is None:
            assert tp == 1, "the first variant draws the weights and must be TP = 1"
            weights = random_released_weights(model)
        load_released(model, weights, tp, mpu.get_tensor_model_parallel_rank())
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        out = ddp(**inputs)
        probe = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
        (out * probe).sum().backward()
        finalize_model_grads([ddp])
        grads = {name: p.main_grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        tagged = sorted(name for name, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
        results.append({
            "tp": tp, "sp": sp, "tp_rank": mpu.get_tensor_model_parallel_rank(), "rank": dist.get_rank(),
            "output": out.detach(), "grads": to_released(grads, cfg), "tagged": tagged,
        })
    return results


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |actual - expected| <= rel * max |expected| (fp32 round-off grows with the tensor's scale)."""
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rel * scale + 1e-7, f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"


def _merge(per_rank: list[dict], cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """Outputs of TP group 0 and its gathered grads; replicated grads must agree across its ranks."""
    from megatron_video.models.suv_mmdit.state_dict_adapter import merge_released, tp_split_rule

    group = sorted((r for r in per_rank if r["rank"] < r["tp"]), key=lambda r: r["tp_rank"])
    for r in group[1:]:
        assert_close_scaled(r["output"], group[0]["output"], 1e-6, "output across TP ranks")
        for key, grad in r["grads"].items():
            if tp_split_rule(key) == "replicated":
                assert_close_scaled(grad, group[0]["grads"][key], 1e-6, f"replica grads of {key} across TP ranks")
    merged = merge_released([r["grads"] for r in group], check_replicated=False)
    return group[0]["output"], merged, group[0]["tagged"]


@pytest.mark.slow
def test_tp_and_sequence_parallel_match_tp1():
    from megatron_video.models.suv_mmdit import suv_config

    cfg = suv_config("small")
    results = run_distributed(tp_worker, 4, cfg, _inputs(cfg), VARIANTS, timeout=600)
    by_variant = [[rank_results[i] for rank_results in results] for i in range(len(VARIANTS))]
    ref_out, ref_grads, _ = _merge(by_variant[0], cfg)
    assert ref_out.abs().max() > 0.1
    for (tp, sp, _), per_rank in zip(VARIANTS[1:], by_variant[1:]):
        out, grads, tagged = _merge(per_rank, cfg)
        assert_close_scaled(out, ref_out, 1e-5, f"output at TP={tp} SP={sp}")
        assert grads.keys() == ref_grads.keys()
        for key in ref_grads:
            assert_close_scaled(grads[key], ref_grads[key], 1e-5, f"grad of {key} at TP={tp} SP={sp}")
        if sp:  # the replicated parameters that see sequence shards are the ones tagged
            assert any(".norm1_video." in n for n in tagged) and any(".long_skip." in n for n in tagged)
            assert any(n.startswith("final.proj_out") for n in tagged)
        else:
            assert tagged == []
