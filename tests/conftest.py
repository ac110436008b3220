import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO.parent / "shared" / "reference" / "golden"

# Several ranks share two cores: one intra-op thread per process keeps multi-rank tests from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden reference folder not found at {GOLDEN_DIR} (it lives in shared/, beside the repo)")
    return GOLDEN_DIR
