"""bf16 training (every launch script uses --bf16) through pretrain_t2v.py on 4 CPU ranks: TP 2 x DP 2,
CP 2 x DP 2 and PP 2 x DP 2 start from the same weights (initialisation depends on --seed only) and see the same
batches and noise, so their losses agree; and they stay close to an fp32 run.

Tolerances: bf16 keeps 8 significant bits (unit roundoff 2^-8 ~ 4e-3 per operation). The layouts round at
different points: TP all-reduces partial row-parallel outputs in bf16, CP splits the attention softmax sums over
ranks, PP runs each stage on its own rank; so bf16 losses differ across layouts by the rounding of reductions
done in another order. Those errors have random sign and the loss averages thousands of them, and gradients are
reduced and applied in fp32 (fp32 main weights), so the losses agree to ~1e-4 relative (measured on this set-up
over 3 steps: <= 9e-5); bound rel 1e-3. bf16 against fp32: the weights themselves are rounded to bf16 and every
matmul runs in bf16, a systematic difference (measured <= 1.9 % by step 3); bound rel 5e-2.
"""

from __future__ import annotations

import pytest

from tests.training_fixtures import TrainingSetup, losses, train_args, train_in_process

pytestmark = pytest.mark.slow

ITERS = 3
LAYOUTS = {
    "tp2_dp2": ["--tensor-model-parallel-size", "2"],
    "cp2_dp2": ["--context-parallel-size", "2"],
    "pp2_dp2": ["--pipeline-model-parallel-size", "2"],
}
LAYOUT_RTOL = 1e-3
FP32_RTOL = 5e-2


@pytest.fixture(scope="module")
def setup(training_setup: TrainingSetup) -> TrainingSetup:
    return training_setup


def _run(setup: TrainingSetup, *flags: str) -> dict[int, float]:
    code, log = train_in_process(4, train_args(setup, ITERS, *flags))
    assert code == 0, log[-3000:]
    result = losses(log)
    assert sorted(result) == list(range(1, ITERS + 1)), log[-3000:]
    return result


@pytest.fixture(scope="module")
def fp32_tp2_dp2(reference_tp2_dp2: dict[int, float]) -> dict[int, float]:
    """The shared fp32 TP 2 x DP 2 run (tests/conftest.py), its first ITERS iterations (constant learning rate)."""
    return {iteration: reference_tp2_dp2[iteration] for iteration in range(1, ITERS + 1)}


@pytest.fixture(scope="module")
def bf16_tp2_dp2(setup: TrainingSetup) -> dict[int, float]:
    return _run(setup, "--bf16", *LAYOUTS["tp2_dp2"])


def test_bf16_is_close_to_fp32(bf16_tp2_dp2: dict[int, float], fp32_tp2_dp2: dict[int, float]):
    assert bf16_tp2_dp2 != fp32_tp2_dp2, "--bf16 must change the compute precision"
    for iteration, loss in bf16_tp2_dp2.items():
        assert loss == pytest.approx(fp32_tp2_dp2[iteration], rel=FP32_RTOL), iteration


@pytest.mark.parametrize("layout", ["cp2_dp2", "pp2_dp2"])
def test_bf16_losses_agree_across_layouts(setup: TrainingSetup, bf16_tp2_dp2: dict[int, float], layout: str):
    other = _run(setup, "--bf16", *LAYOUTS[layout])
    for iteration, loss in other.items():
        assert loss == pytest.approx(bf16_tp2_dp2[iteration], rel=LAYOUT_RTOL), (layout, iteration)
