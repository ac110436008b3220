"""The quickstart's model config, narrowed for CI: the same preset, stand-in latent space (48 channels) and text
sizes, with 4 heads x 16 instead of 4 x 64 (hidden 64 instead of 256), for test_quickstart.py's pipeline run.
The example scripts keep the wider default. (Not for test_train_to_video.py: the narrowed model's held-out loss
fell only 2 % in its 30 iterations, against the 10 % that test asks.) Also: `run_python`, how the example tests
run the repository's tools and entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_MODEL = REPO / "examples" / "quickstart" / "model.yaml"
CI_HEAD_DIM = 16


def narrow_quickstart_model(path: Path) -> Path:
    """Writes the narrowed copy of examples/quickstart/model.yaml to `path`; returns `path`."""
    config = yaml.safe_load(QUICKSTART_MODEL.read_text())
    assert config["head_dim"] > CI_HEAD_DIM, config  # narrower than the example, or this fixture is pointless
    config["head_dim"] = CI_HEAD_DIM
    path.write_text(yaml.safe_dump(config))
    return path


def run_python(*argv: str, threads: int = 1, timeout: float = 900) -> str:
    """`python ARGV...` in the repository with `threads` OpenMP threads; asserts exit 0; returns the output."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr
