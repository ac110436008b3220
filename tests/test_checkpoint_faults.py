"""Faults while saving: writer processes die with a killed job; a full disk leaves no partial checkpoint and says
so plainly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_writers_die_with_a_killed_job(tmp_path: Path):
    pids = tmp_path / "pids"
    pids.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    job = subprocess.Popen([sys.executable, str(REPO / "tests" / "checkpoint_writer_job.py"), str(tmp_path / "ckpt"),
                            str(pids)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(pids.iterdir()):
        assert job.poll() is None and time.monotonic() < deadline, "the job never reached its writers"
        time.sleep(0.2)
    tree = psutil.Process(job.pid).children(recursive=True)
    children = [p.pid for p in tree]
    names = {p.pid: " ".join(p.cmdline())[-80:] for p in tree}
    writers = [int(p.name) for p in pids.iterdir()]
    assert set(writers) <= set(children)
    job.send_signal(signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in children if _alive(pid)]
    for pid in survivors:  # do not leave them behind whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"{[names[p] for p in survivors]} outlived the killed job (of {len(children)} children)"
