"""The upstream implementation's tiny fp32 test vector (tests/data/golden), loaded through the name
mapping: reproduced to <= 1e-5 at TP = 1 and at TP = 2 with and without Megatron sequence parallel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed

GOLDEN = "suv_tiny_L2-2-2_S1-2-1_fp32.safetensors"


def _load(golden_dir: Path) -> tuple[dict, dict, torch.Tensor]:
    from safetensors.torch import load_file

    golden = load_file(golden_dir / GOLDEN)
    weights = {k.removeprefix("state_dict."): v for k, v in golden.items() if k.startswith("state_dict.")}
    inputs = {k.removeprefix("inputs."): v for k, v in golden.items() if k.startswith("inputs.")}
    return weights, inputs, golden["output"]


def golden_worker(weights: dict, inputs: dict, variants: list[tuple[int, bool]]) -> list[torch.Tensor]:
    from megatron.core import parallel_state as mpu

    from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.state_dict_adapter import load_released
    from megatron_video.parallel import initialize_parallel

    cfg, outputs = suv_config("tiny"), []
    for tp, sp in variants:
        initialize_parallel(tensor_model_parallel_size=tp)
        model = SUVMMDiT(cfg, megatron_config(cfg, tensor_model_parallel_size=tp, sequence_parallel=sp,
                                              params_dtype=torch.float32, use_cpu_initialization=True))
        load_released(model, weights, tp, mpu.get_tensor_model_parallel_rank())
        with torch.no_grad():
            outputs.append(model(**inputs))
    return outputs


def test_golden_tp1(tp1, golden_dir: Path) -> None:
    from megatron_video.models.suv_mmdit import suv_config

    meta = json.loads((golden_dir / GOLDEN.replace(".safetensors", ".json")).read_text())["config"]
    cfg = suv_config("tiny")
    assert (list(cfg.num_layers), list(cfg.sparse_n)) == (meta["num_layers"], meta["sparse_n"])
    assert (cfg.num_heads, cfg.head_dim, cfg.in_channels, cfg.timestep_embed_dim, cfg.caption_channels,
            cfg.pooled_projection_dim) == (meta["num_heads"], meta["head_dim"], meta["in_channels"],
                                           meta["timestep_embed_dim"], meta["caption_channels"],
                                           meta["pooled_projection_dim"])
    weights, inputs, expected = _load(golden_dir)
    (out,) = golden_worker(weights, inputs, [(1, False)])
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_golden_tp2_with_and_without_sequence_parallel(golden_dir: Path) -> None:
    """27 video and 7 text tokens: sequence parallel pads both streams to a multiple of TP."""
    weights, inputs, expected = _load(golden_dir)
    per_rank = run_distributed(golden_worker, 2, weights, inputs, [(2, False), (2, True)], timeout=300)
    for rank_outputs in per_rank:
        for out in rank_outputs:
            assert (out - expected).abs().max().item() <= 1e-5
