"""Inpainting keep-masks per task on 8n+1 frame counts, the task mix and the progressive stage schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_video.configfile import ConfigError
from megatron_video.inpaint import TASKS, InpaintConfig, InpaintStage, load_inpaint_config, sample_task
from megatron_video.inpaint.masks import keep_count_range, task_keep_mask

FRAME_COUNTS = (9, 17, 33, 121)
REPO = Path(__file__).resolve().parents[1]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kept(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_fixed_tasks(frames: int) -> None:
    assert kept(task_keep_mask("t2v", frames, gen())) == []
    assert kept(task_keep_mask("i2v", frames, gen())) == [0]
    assert kept(task_keep_mask("transition", frames, gen())) == [0, frames - 1]
    assert kept(task_keep_mask("clear", frames, gen())) == list(range(frames))


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_continuation_keeps_a_prefix_within_bounds(frames: int) -> None:
    low, high = keep_count_range(frames, 0.25, 0.5)
    counts = set()
    for seed in range(40):
        mask = task_keep_mask("continuation", frames, gen(seed), 0.25, 0.5)
        n = int(mask.sum())
        assert kept(mask) == list(range(n))
        assert low <= n <= high
        counts.add(n)
    assert low >= frames / 4 and high <= frames / 2
    assert len(counts) > 1 or low == high


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_random_keeps_n_frames_anywhere(frames: int) -> None:
    low, high = keep_count_range(frames, 0.0, 0.5)
    seen = torch.zeros(frames, dtype=torch.bool)
    for seed in range(40):
        mask = task_keep_mask("random", frames, gen(seed), 0.0, 0.5)
        assert low <= int(mask.sum()) <= high
        seen |= mask
    assert low == 1 and seen[1:].any()  # not only a prefix


def test_keep_count_bounds_always_leave_something_to_generate() -> None:
    assert keep_count_range(9, 0.0, 1.0) == (1, 8)
    assert keep_count_range(9, 0.9, 1.0) == (8, 8)
    assert keep_count_range(17, 0.5, 0.5) == (9, 9)
    with pytest.raises(ValueError, match="at least 2"):
        keep_count_range(1, 0.0, 0.5)


def test_single_frame_keeps_nothing_and_unknown_task_fails() -> None:
    for task in TASKS:
        assert kept(task_keep_mask(task, 1, gen())) == []
    with pytest.raises(ValueError, match="unknown task"):
        task_keep_mask("outpaint", 9, gen())


def test_masks_are_reproducible_from_the_generator() -> None:
    a = [task_keep_mask("random", 33, gen(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    assert any(not torch.equal(a[0], task_keep_mask("random", 33, gen(s))) for s in range(6, 10))


def test_task_mix_follows_the_ratios() -> None:
    stage = InpaintStage(0, {"i2v": 3.0, "continuation": 1.0})
    g = gen(1)
    draws = [sample_task(stage, g) for _ in range(2000)]
    assert set(draws) == {"i2v", "continuation"}
    assert abs(draws.count("i2v") / len(draws) - 0.75) < 0.04


def test_progressive_schedule_by_step_and_by_samples() -> None:
    stages = [InpaintStage(0, {"i2v": 1.0}), InpaintStage(100, {"continuation": 1.0}),
              InpaintStage(300, {"random": 1.0})]
    by_step = InpaintConfig(stages=stages)
    assert [by_step.stage_at(i, 10**9).start for i in (0, 99, 100, 299, 300, 10**6)] == [0, 0, 100, 100, 300, 300]
    by_samples = InpaintConfig(stages=stages, schedule_by="samples")
    assert [by_samples.stage_at(10**6, s).start for s in (0, 99, 100, 300)] == [0, 0, 100, 300]


@pytest.mark.parametrize("bad, message", [
    ({"stages": [{"start": 5, "ratios": {"i2v": 1}}]}, "begin at 0"),
    ({"stages": [{"start": 0, "ratios": {"i2v": 1}}, {"start": 0, "ratios": {"t2v": 1}}]}, "strictly increase"),
    ({"stages": [{"start": 0, "ratios": {"zoom": 1}}]}, "unknown task"),
    ({"stages": [{"start": 0, "ratios": {"i2v": 0}}]}, "positive ratio"),
    ({"loss_on": "kept"}, "loss_on"),
    ({"schedule_by": "epoch"}, "schedule_by"),
    ({"min_keep_fraction": 0.6, "max_keep_fraction": 0.5}, "min_keep_fraction"),
    ({"kept_noise_std": -1.0}, "kept_noise_std"),
    ({"ratio": 1}, "unknown key"),
])
def test_config_file_errors_name_the_problem(tmp_path: Path, bad: dict, message: str) -> None:
    import yaml

    path = tmp_path / "inpaint.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=message):
        load_inpaint_config(path)


def test_example_config_loads_and_gets_harder() -> None:
    cfg = load_inpaint_config(REPO / "examples/i2v/inpaint.yaml")
    first, last = cfg.stages[0].probabilities(), cfg.stages[-1].probabilities()
    easy = TASKS.index("i2v")
    assert len(cfg.stages) >= 2 and last[easy] < first[easy]
    assert abs(sum(last) - 1.0) < 1e-9
