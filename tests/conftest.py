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


@pytest.fixture(scope="session")
def training_setup(tmp_path_factory: pytest.TempPathFactory):
    """The tiny end-to-end training set-up (tests/training_fixtures.py), built once for the session."""
    from tests.training_fixtures import make_training_setup

    return make_training_setup(tmp_path_factory.mktemp("training"))


@pytest.fixture(scope="session")
def reference_tp2_dp2(training_setup, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """An uninterrupted 6-iteration fp32 TP=2 x DP=2 run of `training_setup` (with TensorBoard), shared by the
    tests that compare another layout, precision or a resumed run with it (constant learning rate, so its first
    iterations are those of any shorter run)."""
    from tests.training_fixtures import losses, train_args, train_in_process

    tensorboard = tmp_path_factory.mktemp("tb")
    code, log = train_in_process(4, train_args(training_setup, 6, "--tensor-model-parallel-size", "2",
                                           "--tensorboard-dir", str(tensorboard)))
    assert code == 0, log[-3000:]
    assert list(tensorboard.glob("events.out.tfevents.*")), "TensorBoard events must be written"
    return losses(log)
