"""Model FLOPs for the throughput log (training/flops.py): dense matmuls, skiparse attention, frozen parameters."""

from __future__ import annotations

import pytest
import torch

from megatron_video.training.flops import training_flops_per_sample


def test_training_flops_count_matmuls_attention_and_frozen_parameters() -> None:
    params, hidden, video, text = 1000, 8, 30, 2
    seq = video + text
    dense = training_flops_per_sample(params, hidden, [1, 1], video, text)
    assert dense == 6 * params * seq + 12 * hidden * seq * 2 * seq
    sparse = training_flops_per_sample(params, hidden, [1, 4], video, text)
    assert dense - sparse == pytest.approx(12 * hidden * seq * (seq - seq / 4))
    # a frozen base: forward and activation gradient (4 per parameter and token), no weight gradient
    frozen = training_flops_per_sample(params, hidden, [1, 1], video, text, frozen_params=600)
    assert dense - frozen == 2 * 600 * seq
    with pytest.raises(ValueError, match="frozen_params"):
        training_flops_per_sample(params, hidden, [1], video, text, frozen_params=params + 1)


def test_attention_blocks_of_the_controlled_model(tp1) -> None:
    from megatron_video.models.control import ControlConfig, ControlledSUV
    from megatron_video.models.suv_mmdit import SUVMMDiT, megatron_config, suv_config

    cfg = suv_config("small")
    base = SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True))
    assert base.attention_sparsity() == [spec.k for spec in cfg.block_specs()] == [1, 1, 2, 2, 4, 4, 2, 2, 1, 1]
    controlled = ControlledSUV(base, ControlConfig(num_blocks=2))
    assert controlled.attention_sparsity() == [1, 1, 2, 2, 4, 4, 2, 2, 1, 1, 1, 1]
    narrow = ControlledSUV(SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True)),
                           ControlConfig(num_blocks=2, hidden_size=16))
    assert narrow.attention_sparsity()[-3:] == [1, 4.0, 4.0]  # a quarter of the width: a quarter of the cost
    assert all(not p.requires_grad for p in controlled.base.parameters())  # what the loop counts as frozen
    assert all(p.requires_grad for p in controlled.controller.parameters())  # what the loop counts as trained
