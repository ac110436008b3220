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
