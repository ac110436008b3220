"""Checkpoint writer processes that die with the training process.

megatron-core's dist_checkpointing writes through processes it starts itself: writer processes forked per save
(and, for an asynchronous save, a forked writer that forks more) and one spawned `multiprocessing` manager that
carries their results back (`filesystem_async._get_write_results_queue`, created on the first save and kept).
When the training process is killed (SIGKILL, OOM killer, a scheduler), none of them is told: they block for
ever on a queue nobody reads. Linux can deliver a signal to a process when its parent dies (PR_SET_PDEATHSIG);
each of these processes asks for SIGKILL as soon as it starts:
- forked processes through an `os.register_at_fork` hook, armed only while a checkpoint is being saved;
- the manager through its initializer: the results queue is created here, before megatron would create its own.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """In a new child of `parent`: be SIGKILLed when the parent dies (no-op without Linux's prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class WritersDieWithParent:
    """Context manager around a checkpoint save (see module docstring)."""

    active = False
    parent = 0

    @classmethod
    def _after_fork_in_child(cls) -> None:
        if cls.active:
            die_with_parent(cls.parent)
            cls.parent = os.getpid()  # for the processes this one forks in turn

    def __enter__(self) -> None:
        _install_results_queue()
        type(self).active, type(self).parent = True, os.getpid()

    def __exit__(self, *exc: object) -> None:
        type(self).active = False


def _install_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        import multiprocessing as mp
        from multiprocessing.managers import SyncManager

        # what megatron does (`mp.get_context("spawn").Manager().Queue()`), with the initializer added
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(die_with_parent, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WritersDieWithParent._after_fork_in_child)
