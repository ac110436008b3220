"""The training log: a Megatron-shaped console line averaged over --log-interval, TensorBoard from the same rank
agreeing with it, the run's flags and configs as TensorBoard text, no column for a feature that is off, and a
resumed run into the same directory showing every iteration once."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_video.training.logger import TrainLogger, format_line, interval_values

LINE = re.compile(r"^ \[[0-9-]+ [0-9:]+\] iteration\s+(\d+)/\s*(\d+) \| (.*) \|$")


def _scalars(iteration: int, run: int = 0) -> dict[str, float]:
    return {"loss": 1.0 / iteration + run, "grad_norm": 0.5 * iteration, "lr": 1e-3 * iteration,
            "iteration_ms": 100.0 * iteration, "consumed_samples": 4.0 * iteration, "skipped": float(iteration == 2),
            "mem_gib": float(iteration), "video_tokens_per_s": 10.0 * iteration, "tflops_per_device": 0.5,
            "clip_threshold": math.inf, "clip_mu": math.nan, "clip_var": math.nan, "bad_samples": 0.0}


def _fields(line: str) -> dict[str, str]:
    match = LINE.match(line)
    assert match, line
    return dict(field.split(": ", 1) for field in match.group(3).split(" | "))


def _events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@dataclass
class _Model:
    hidden_size: int = 8
    num_layers: tuple = (2, 2)


def test_console_averages_the_interval_and_agrees_with_tensorboard(tmp_path: Path, capsys) -> None:
    args = argparse.Namespace(lr=1e-3, log_interval=2, model_config=_Model(), data_config=None)
    log = TrainLogger(4, str(tmp_path / "tb"), log_interval=2, global_batch_size=4, args=args)
    for iteration in range(1, 5):
        log.log(iteration, _scalars(iteration))
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # iterations 2 and 4
    fields = _fields(lines[1])
    # Megatron's columns, in its order, then ours
    assert list(fields)[:9] == ["consumed samples", "elapsed time per iteration (ms)", "learning rate",
                                "global batch size", "loss", "grad norm", "number of skipped iterations",
                                "video tokens per second", "TFLOP/s per device"]
    assert float(fields["loss"]) == pytest.approx((1 / 3 + 1 / 4) / 2, rel=1e-6)  # mean of iterations 3, 4
    assert float(fields["elapsed time per iteration (ms)"]) == pytest.approx(350.0)
    assert float(fields["learning rate"]) == pytest.approx(4e-3)  # the latest
    assert float(fields["consumed samples"]) == 16 and int(fields["global batch size"]) == 4
    assert int(_fields(lines[0])["number of skipped iterations"]) == 1  # counted over iterations 1-2
    assert float(fields["max memory (GiB)"]) == 4.0
    # features that are off (clip statistics of the constant clip, MFU without --peak-tflops): no column
    assert "nan" not in lines[1].lower() and "inf" not in lines[1].lower() and "MFU" not in lines[1]
    # TensorBoard holds every iteration; the console's value is the mean of the interval's points
    events = _events(tmp_path / "tb")
    assert [step for step, _ in events["loss"]] == [1, 2, 3, 4]
    assert float(fields["loss"]) == pytest.approx(sum(v for s, v in events["loss"] if s > 2) / 2, rel=1e-6)
    assert float(fields["grad norm"]) == pytest.approx(sum(v for s, v in events["grad_norm"] if s > 2) / 2)
    assert not {"clip_mu", "clip_var", "clip_threshold", "mfu"} & set(events)


def test_mfu_only_with_peak(capsys) -> None:
    line = format_line(3, 10, 4, interval_values([{**_scalars(3), "mfu": 42.0}]))
    assert _fields(line)["MFU (%)"] == "42.00"


def test_flags_and_configs_are_tensorboard_text(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = argparse.Namespace(lr=1e-3, weight_decay=0.01, model_config=_Model(), data_config=None)
    log = TrainLogger(2, str(tmp_path), log_interval=1, global_batch_size=4, args=args)
    log.log(1, _scalars(1))
    log.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    assert {"hyperparameters/text_summary", "model_config/text_summary"} <= set(texts)
    assert "| weight_decay | 0.01 |" in texts["hyperparameters/text_summary"]
    assert '"hidden_size": 8' in texts["model_config/text_summary"]


def test_second_run_into_the_same_directory_logs_each_iteration_once(tmp_path: Path, capsys) -> None:
    """Run 1 logs iterations 1-4 and is cut off; run 2 resumes from its checkpoint at iteration 2 and logs 3-6
    into the same directory: TensorBoard shows 1-6 once each, 3-4 from run 2 (purge_step)."""
    first = TrainLogger(6, str(tmp_path), log_interval=1)
    for iteration in range(1, 5):
        first.log(iteration, _scalars(iteration, run=0))
    first.close()
    second = TrainLogger(6, str(tmp_path), log_interval=1)
    for iteration in range(3, 7):
        second.log(iteration, _scalars(iteration, run=10))
    second.close()
    loss = _events(tmp_path)["loss"]
    assert [step for step, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert [value > 10 for _, value in loss] == [False, False, True, True, True, True]
