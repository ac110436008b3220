"""Stages with an odd number of blocks: upstream SparseUMMDiT refuses them ("num_layers must have even numbers",
mindspeed_mm/models/predictor/dits/sparseu_mmdit.py, SparseUMMDiT.__init__); we accept them, warn once, and the
model builds and runs."""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_video.models.suv_mmdit import config as suv_config_module
from megatron_video.models.suv_mmdit.config import SUVConfig, suv_config

ODD = (1, 3, 1)


def test_odd_stage_accepted_and_warned_once(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(suv_config_module, "_ODD_STAGES_WARNED", set())
    caplog.set_level(logging.WARNING, logger=suv_config_module.__name__)
    cfg = suv_config("tiny", num_layers=ODD)
    cfg.replace(norm_eps=1e-5)  # a second config of the same shape: no second warning
    warnings = [r for r in caplog.records if "odd number of blocks" in r.getMessage()]
    assert len(warnings) == 1
    assert "stage(s) [0, 1, 2]" in warnings[0].getMessage()
    modes = [(s.stage, s.mode) for s in cfg.block_specs()]
    assert modes == [(0, "full"), (1, "single"), (1, "group"), (1, "single"), (2, "full")]
    caplog.clear()
    SUVConfig()  # the released shape (all stages even) says nothing
    assert not [r for r in caplog.records if "odd number" in r.getMessage()]


def test_odd_stage_model_runs(tp1) -> None:
    from tests.test_suv_model import build
    from tests.test_suv_tp import _inputs

    cfg = suv_config("tiny", num_layers=ODD)
    model = build(cfg).eval()
    with torch.no_grad():
        out = model(**_inputs(cfg))
    assert torch.isfinite(out).all()
    assert out.shape[1] == cfg.out_channels
