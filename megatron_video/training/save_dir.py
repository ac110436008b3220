"""What a checkpoint directory holds, read without a process group, and the lock on `--save`.

Used before any process group is built (training/preflight.py) to decide where a run resumes from, to refuse a
run that would publish over newer checkpoints, and to keep two jobs from writing one `--save`.

The lock is a small JSON file `<save>/.megatron_video.lock` naming the holder (host, PID, the PID's start time,
the scheduler's job id), linked into place by global rank 0 and removed when that process exits. A lock is
stale, and is taken over, when its holder is on this host and its PID is gone or belongs to another process
(same PID, different start time: PIDs are reused), or when it carries this job's own Slurm job id (a requeued
job: Slurm ends every step of the previous incarnation before requeueing it). A live holder on another host
cannot be checked from here; the message says how to remove the lock once that job is known to be gone.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

from megatron_video.training.checkpointing import TRACKER, CheckpointError, latest_iteration, published_iterations

LOCK_NAME = ".megatron_video.lock"
MODEL_CONFIG_NAME = "model_config.json"


class SaveDirError(RuntimeError):
    """A checkpoint directory that cannot be used as asked; the message says why and what to do."""


def _tracked(root: Path) -> int | None:
    try:
        return latest_iteration(root)
    except CheckpointError as exc:
        raise SaveDirError(str(exc)) from exc


def resume_iteration(load: str | Path) -> int | None:
    """The iteration a `--load` of `load` resumes from: the tracker's, or None when `load` is absent or holds
    no checkpoint at all (a fresh start). Published checkpoints without a tracker are an error (the run would
    silently start over beside them)."""
    load = Path(load)
    if not load.exists():
        return None
    if not load.is_dir():
        raise SaveDirError(f"--load {load} is not a directory")
    tracked = _tracked(load)
    if tracked is None and published_iterations(load):
        raise SaveDirError(f"--load {load} holds checkpoints {published_iterations(load)} but no {TRACKER}; "
                           f"write the iteration to resume from into {load / TRACKER}")
    return tracked


# ----------------------------------------------------------------------------------------------- model config


def write_model_config(checkpoint_dir: str | Path, config: Any) -> None:
    """Store the model config beside a published checkpoint (plain JSON, read before anything is built)."""
    path = Path(checkpoint_dir) / MODEL_CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_plain(dataclasses.asdict(config)), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def saved_model_config(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    path = Path(checkpoint_dir) / MODEL_CONFIG_NAME
    if not path.is_file():
        return None  # saved before the config was recorded
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SaveDirError(f"{path}: not valid JSON ({exc})") from exc


def model_config_differences(saved: dict[str, Any], config: Any) -> list[str]:
    """`key: checkpoint X, --model-config Y` for every field that differs (the attention backend and the
    initialisation scale are not compared: they do not change what the saved weights mean)."""
    current = _plain(dataclasses.asdict(config))
    ignored = {"attention_backend", "init_std"}
    keys = sorted((set(saved) | set(current)) - ignored)
    return [f"{k}: checkpoint {saved.get(k)!r}, --model-config {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so a saved config compares equal to the same config."""
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------------------------------------------- lock


def _process_start_time(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3


def lock_identity(pid: int | None = None) -> dict[str, Any]:
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start_time": _process_start_time(pid),
            "job_id": os.environ.get("SLURM_JOB_ID")}


def _is_stale(holder: dict[str, Any]) -> bool:
    me = lock_identity()
    if holder.get("job_id") is not None and holder.get("job_id") == me["job_id"]:
        return True
    if holder.get("host") != me["host"]:
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True  # not a lock this code wrote: nothing to protect
    start = _process_start_time(pid)
    return start is None or start != holder.get("start_time")


def _describe(holder: dict[str, Any]) -> str:
    text = f"host {holder.get('host')}, PID {holder.get('pid')}"
    return text + (f", Slurm job {holder['job_id']}" if holder.get("job_id") else "")


class SaveDirLock:
    """`<save>/.megatron_video.lock`, held by this process until `release()` or its exit."""

    def __init__(self, save_dir: str | Path) -> None:
        self.path = Path(save_dir) / LOCK_NAME
        self.identity = lock_identity()
        self.held = False

    def acquire(self) -> SaveDirLock:
        # the lock is written whole under a private name, then linked into place: a reader never sees it half
        # written, and link() fails instead of replacing a lock that exists
        mine = self.path.with_name(f"{LOCK_NAME}.{self.identity['host']}.{os.getpid()}")
        mine.write_text(json.dumps(self.identity))
        try:
            for _ in range(2):  # a second try after taking over a stale lock
                try:
                    os.link(mine, self.path)
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                self.held = True
                atexit.register(self.release)
                return self
        finally:
            mine.unlink(missing_ok=True)
        raise SaveDirError(f"{self.path.parent} is in use by another job (lock {self.path}); two jobs must not "
                           "write one --save")

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # unreadable or half-written by a killed job
        return holder if isinstance(holder, dict) else {}

    def _take_over_if_stale(self) -> None:
        holder = self._read(self.path)
        if holder is None:
            return  # released meanwhile: try again
        if holder and not _is_stale(holder):
            raise SaveDirError(
                f"{self.path.parent} is in use by another job ({_describe(holder)}): two jobs must not write "
                f"one --save. If that job is gone (e.g. its node died), delete {self.path} and start again")
        # Move the stale lock aside (atomic), then check that what moved is the lock judged stale: another job
        # taking over at the same moment may have replaced it with its own live lock, which is put back.
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) == holder:
            aside.unlink(missing_ok=True)
            return
        try:
            os.link(aside, self.path)  # never replaces a lock created meanwhile
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        raise SaveDirError(f"{self.path.parent} was just locked by another job starting at the same time")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._read(self.path) == self.identity:
            self.path.unlink(missing_ok=True)
