"""bench/gpu/check.sh in its dry mode (CPU, tiny sizes): the self-check, then pretrain_t2v.py through the device
check's steps (reference run, save at half way, resumed run, dense run), with the results file it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # five launches (self-check, four training runs): ~2 min of CPU, longer on a busy host
def test_device_check_dry_run(tmp_path: Path):
    env = dict(os.environ, DRY_RUN="1", CHECK_OUT=str(tmp_path / "out"), WHEELS_DIR=str(tmp_path / "no_wheels"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    selfcheck = (tmp_path / "out" / "selfcheck.txt").read_text()
    assert "PASS: collectives and the tensor-parallel matmul check out" in selfcheck
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["device"] == "cpu" and results["dry_run"] is True
    assert results["exact_resume"] is True
    resumed = results["resume_losses"]
    assert sorted(resumed["resumed"]) == ["3", "4"] and resumed["resumed"] == resumed["reference"]
    assert results["latent_shape"] == [4, 2, 4, 4]
    assert results["model"]["sparse_n"] == [1, 2, 4, 8, 4, 2, 1]
    assert results["attention_backend"] == "sdpa"
    for key in ("step_time_s", "dense_step_time_s", "skiparse_over_dense_step_time", "mfu", "peak_memory_gib"):
        assert results[key] > 0, key
