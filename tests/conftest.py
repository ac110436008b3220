import os
from pathlib import Path

import pytest

from tests.no_skip import pytest_runtest_makereport  # noqa: F401  (skips fail)

REPO = Path(__file__).resolve().parents[1]
# Reference data the tests read travels with the repository (tests/data/README.md says where each came from).
DATA_DIR = REPO / "tests" / "data"
GOLDEN_DIR = DATA_DIR / "golden"

# Several ranks share two cores: one intra-op thread per process keeps multi-rank tests from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    # a missing file in the repository is a failure, never a skip
    assert GOLDEN_DIR.is_dir(), f"golden reference folder missing from the repository: {GOLDEN_DIR}"
    return GOLDEN_DIR


@pytest.fixture(scope="module")
def tp1() -> None:
    """A single-process TP = 1 megatron-core parallel state (gloo on CPU) inside the pytest process."""
    import torch.distributed as dist

    from megatron_video.parallel import init_distributed, initialize_parallel
    from megatron_video.parallel.spawn import free_port

    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())
        init_distributed("cpu")
    if dist.get_world_size() != 1:
        pytest.fail("these tests need a single-process group")
    initialize_parallel(tensor_model_parallel_size=1)
