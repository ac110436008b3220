"""The i2v example: the launch script parses and asks for its paths; the sample configs load and fit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from megatron_video.configfile import read_mapping
from megatron_video.data.config import DataConfig
from megatron_video.inpaint import load_inpaint_config
from megatron_video.inpaint.training import check_i2v_configs
from megatron_video.models.registry import model_config_from_mapping

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "i2v"


def test_launch_script_parses_and_names_missing_paths() -> None:
    script = EXAMPLE / "train_cpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_CONFIG", "VAE_PATH", "T5_PATH", "CLIP_PATH")}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode != 0 and "DATA_CONFIG" in proc.stderr


def test_sample_configs_fit_together() -> None:
    inpaint = load_inpaint_config(EXAMPLE / "inpaint.yaml")
    model = model_config_from_mapping(read_mapping(EXAMPLE / "model_small_i2v.yaml"))
    check_i2v_configs(inpaint, model, DataConfig(metadata_paths=["unused.txt"]))
    assert model.condition_channels == model.in_channels + 8
