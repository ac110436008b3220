"""A tiny end-to-end training set-up: the generated sample data set, a feature cache built with the stub
encoders, model/data configs, and helpers that launch `pretrain_t2v.py` under torchrun and read its log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_video.parallel.spawn import free_port
from tests.data_fixtures import make_sample_dataset

REPO = Path(__file__).resolve().parents[1]
# the console line of one iteration (docs: megatron_video/training/logger.py), logged every iteration here
ITERATION_LINE = re.compile(r"\] iteration\s+(\d+)/\s*\d+ \|.*?\| loss: ([^ |]+) \|", re.M)


@dataclass(frozen=True)
class TrainingSetup:
    root: Path
    model_config: Path
    data_config: Path


def make_training_setup(root: Path) -> TrainingSetup:
    """Sample videos + images -> feature cache (tools/cache_features.py, stub encoders: 4 latent channels,
    16-d text states, 8-d pooled) -> configs for the small preset."""
    data_dir = make_sample_dataset(root / "data")
    data = {
        "metadata_paths": [str(data_dir / "data.txt")],
        "shape": {"resolution_mode": "forced", "height": 32, "width": 32, "num_frames": 9, "min_num_frames": 9,
                  "fps": 8},
        "num_workers": 0,
    }
    (root / "decode.yaml").write_text(yaml.safe_dump(data))
    subprocess.run([sys.executable, str(REPO / "tools" / "cache_features.py"), "--data-config",
                    str(root / "decode.yaml"), "--out", str(root / "cache"), "--encoders", "stub"],
                   check=True, capture_output=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    data["cache_path"] = str(root / "cache")
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    model = {"preset": "small", "caption_channels": 16, "pooled_projection_dim": 8}
    (root / "model.yaml").write_text(yaml.safe_dump(model))
    return TrainingSetup(root, root / "model.yaml", root / "data.yaml")


def torchrun_command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", str(REPO / "pretrain_t2v.py"), "--device", "cpu", *args]


def train_args(setup: TrainingSetup, iters: int, *extra: str, gbs: int = 4) -> list[str]:
    return ["--model-config", str(setup.model_config), "--data-config", str(setup.data_config),
            "--train-iters", str(iters), "--global-batch-size", str(gbs), "--micro-batch-size", "1",
            "--lr", "1e-3", "--lr-decay-style", "constant", "--log-interval", "1", "--use-distributed-optimizer",
            "--distributed-timeout-minutes", "1", *extra]


def run_training(nproc: int, args: list[str], timeout: float = 300) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(torchrun_command(nproc, *args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _pretrain_on_rank(argv: list[str]) -> tuple[int, str]:
    """One rank of `train_in_process`: pretrain() with this rank's output captured."""
    import contextlib
    import io

    from megatron_video.training.loop import pretrain

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = pretrain(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return code, out.getvalue()


def train_in_process(nproc: int, args: list[str], timeout: float = 300) -> tuple[int, str]:
    """The trainer (`pretrain`, what pretrain_t2v.py runs after its preflight) on `nproc` gloo ranks forked from
    the test harness's preloaded server: the same training as `run_training` without a launcher and without each
    rank importing torch and megatron-core afresh (about 11 s of CPU per rank). For tests about what training
    computes; tests of the command line, the preflight, signals or the launcher use `run_training`.
    Returns (the highest exit code, every rank's output)."""
    from megatron_video.parallel.spawn import run_distributed

    results = run_distributed(_pretrain_on_rank, nproc, ["--device", "cpu", *args], timeout=timeout,
                              threads_per_rank=1)
    return max(code for code, _ in results), "".join(log for _, log in results)


def losses(log: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in ITERATION_LINE.finditer(log)}


def start_training(nproc: int, args: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    handle = open(log_path, "w")
    return subprocess.Popen(torchrun_command(nproc, *args), cwd=REPO, env=env, stdout=handle,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(log_path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if re.search(pattern, text, re.M):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {pattern!r}:\n{text[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} did not appear within {timeout} s:\n{log_path.read_text()[-3000:]}")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill the launcher and every worker (torchrun starts its workers in sessions of their own)."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    for process in [*tree, psutil.Process(proc.pid)]:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)


def checkpoint_tensors(directory: Path, scratch: Path) -> dict[str, Any]:
    """Everything in a dist checkpoint's shards (weights, EMA, optimizer state in global shape, per-rank RNG
    objects), read without a process group (torch.distributed.checkpoint.format_utils.dcp_to_torch_save)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(directory), str(scratch))
    return torch.load(scratch, weights_only=True)


def same_values(a: Any, b: Any) -> bool:
    """Bitwise equality of nested tensors / lists / dicts / plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, type(a)) and len(a) == len(b) and all(map(same_values, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    return a == b
