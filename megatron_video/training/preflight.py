"""Checks that run before any process group, model or data loader is built, called first by the entry points.

Every rank runs them (they read only the command line and the file system); a failure prints one message
from global rank 0, with no traceback, and every rank exits with code 2 (other ranks silently). Checked:
the command line and config files (arguments.py), every metadata file the data config names, `--save`
(a writable directory, not held by another job, holding no checkpoint newer than the run starts from), and
`--load` (a complete checkpoint whose model config matches `--model-config`, or, when `--load` is `--save`,
no checkpoint at all: the first run of a job starts from scratch, as Megatron does).

Global rank 0 then holds the lock on `--save` (training/save_dir.py) until it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


class PreflightError(RuntimeError):
    """A run that must not start; the message says why and what to do."""


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Ranks other than 0 print nothing (argparse's usage, --help): the job's log shows every message once."""
    if not enabled:
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def preflight(argv: Sequence[str], extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
              check: Callable[[argparse.Namespace], None] | None = None) -> None:
    """Validate the run described by `argv`; print one error and exit 2 when it must not start. `extra_args`
    adds an entry point's flags, `check(args)` its own checks (raising ValueError)."""
    from megatron_video.arguments import ArgumentError

    rank = _global_rank()
    # libraries' import-time warnings would bury the one error line: held back, and shown only if the run starts
    with _quiet(rank != 0), warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("default")
        try:  # argparse errors (exit 2) and --help (exit 0) leave through SystemExit
            check_run(argv, extra_args, rank, check)
        except (ArgumentError, PreflightError) as exc:
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    for w in held:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def check_run(argv: Sequence[str], extra_args: Callable | None = None, rank: int = 0,
              check: Callable | None = None, training: bool = True) -> argparse.Namespace:
    """Every check; raises ArgumentError / PreflightError. Rank 0 also takes the lock on `--save`.
    `training=False` leaves out the flags only a training run needs (for checking parts of a command line)."""
    from megatron_video.arguments import parse_args
    from megatron_video.training.save_dir import SaveDirError

    args = parse_args(list(argv), extra_args=extra_args)
    check_checkpoints_are_safe(args)  # first: nothing else may read a checkpoint that would run code
    if check is not None:
        try:
            check(args)
        except ValueError as exc:
            raise PreflightError(str(exc)) from exc
    if training and (args.model_config is None or args.data_config is None or args.train_iters is None):
        raise PreflightError("training needs --model-config, --data-config and --train-iters")
    try:
        if args.data_config is not None:
            check_metadata(args.data_config)
        start = check_load(args)
        if args.save is not None:
            check_save(args.save, create=rank == 0)
            if rank == 0:
                from megatron_video.training.save_dir import SaveDirLock

                SaveDirLock(args.save).acquire()
            check_no_newer(args, start)
    except SaveDirError as exc:
        raise PreflightError(str(exc)) from exc
    return args


def check_checkpoints_are_safe(args: argparse.Namespace) -> None:
    """Every checkpoint the run would read (`--load`, and `--init-from-t2v` where the entry point has it) holds
    only checkpoint metadata and tensors (training/checkpoint_safety.py)."""
    from megatron_video.training.checkpoint_safety import checkpoint_refusal

    for flag in ("--load", "--init-from-t2v"):
        try:
            refusal = checkpoint_refusal(getattr(args, flag[2:].replace("-", "_"), None), flag)
        except FileNotFoundError:  # not a complete checkpoint: check_load / the entry point's checks say so
            continue
        if refusal is not None:
            raise PreflightError(refusal)


def check_metadata(data_config: Any) -> None:
    """Every metadata file (data.txt, annotation JSON, Parquet) and the feature cache directory exist."""
    from megatron_video.data.bucket_index import planned_metadata
    from megatron_video.data.metadata import MetadataError, read_data_txt

    if not data_config.metadata_paths:
        raise PreflightError("--data-config: metadata_paths is empty")
    for path in data_config.metadata_paths:
        if not Path(path).is_file():
            raise PreflightError(f"--data-config: metadata file not found: {path}")
        if path.endswith((".json", ".parquet")):
            continue
        try:
            annotations = [ann for _, ann in read_data_txt(path)]
        except MetadataError as exc:
            raise PreflightError(f"--data-config: {exc}") from exc
        for annotation in annotations:
            if not Path(annotation).is_file():
                raise PreflightError(f"--data-config: {path} names an annotation file that does not exist: "
                                     f"{annotation}")
    planned = planned_metadata(data_config.metadata_paths)
    if planned is not None and data_config.cache_path is None:  # the index training will read
        check_bucket_index(planned, data_config.shape)
    cache = data_config.cache_path
    if cache is not None and not Path(cache).is_dir():
        raise PreflightError(f"--data-config: cache_path is not a directory: {cache}")
    if cache is not None and (Path(cache) / "meta.json").is_file():
        check_cache_index(cache)


def check_cache_index(cache: str) -> None:
    """A merged feature cache's memory-mapped per-sample arrays are whole."""
    import json

    from megatron_video.data.cache import open_index_arrays

    try:
        open_index_arrays(cache, int(json.loads((Path(cache) / "meta.json").read_text())["num_samples"]))
    except (ValueError, KeyError) as exc:
        raise PreflightError(f"--data-config: {exc}") from exc


def check_bucket_index(path: str, shape: Any) -> None:
    """The planned bucket index next to Parquet metadata (tools/plan_buckets.py) must match it and `shape`."""
    from megatron_video.data.bucket_index import BucketIndexError, load_bucket_index

    try:
        load_bucket_index(path, shape)
    except BucketIndexError as exc:
        raise PreflightError(f"--data-config: {exc}") from exc


def _same_dir(a: str, b: str | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def check_load(args: argparse.Namespace) -> int:
    """The iteration the run starts from (0 for a fresh start or --finetune). `--load` must hold a complete
    checkpoint of the same model, unless it is `--save` and holds none yet (the first run of a job)."""
    from megatron_video.training.checkpointing import iteration_dir
    from megatron_video.training.save_dir import model_config_differences, resume_iteration, saved_model_config

    if args.load is None:
        return 0
    iteration = resume_iteration(args.load)
    if iteration is None:
        if _same_dir(args.load, args.save) and not args.finetune:
            return 0  # the loop logs "starting from scratch"
        raise PreflightError(f"--load {args.load}: no checkpoint there (no latest_checkpointed_iteration.txt)"
                             + ("" if args.finetune else "; to start from scratch, leave out --load or make it "
                                "the same directory as --save"))
    saved = saved_model_config(iteration_dir(args.load, iteration))
    if saved is not None and args.model_config is not None:
        differences = model_config_differences(saved, args.model_config)
        if differences:
            raise PreflightError(f"--load {iteration_dir(args.load, iteration)} was saved with another model "
                                 "config than --model-config: " + "; ".join(differences))
    return 0 if args.finetune else iteration


def check_save(save: str, create: bool) -> None:
    """`--save` is a directory this process can create files in (checked by creating one)."""
    path = Path(save)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"--save {save} exists and is not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PreflightError(f"--save {save}: {parent} is not a directory")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PreflightError(f"--save {save}: cannot create the directory ({exc.strerror})") from exc
    probe_dir = path if path.is_dir() else parent
    probe = probe_dir / f".write_test.{os.uname().nodename}.{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(f"--save {save}: cannot write into {probe_dir} ({exc.strerror})") from exc


def check_no_newer(args: argparse.Namespace, start: int) -> None:
    """Refuse a run that would publish checkpoints over newer ones in `--save` (unless told to)."""
    from megatron_video.training.checkpointing import newest_iteration

    newest = newest_iteration(Path(args.save))
    if newest is None or newest <= start or args.overwrite_newer_checkpoints:
        return
    origin = f"iteration {start} of --load {args.load}" if args.load and start else "scratch (iteration 0)"
    raise PreflightError(
        f"--save {args.save} holds a checkpoint of iteration {newest}, newer than this run starts from ({origin}); "
        f"its saves would overwrite newer work. To resume, pass --load {args.save}; to overwrite on purpose, pass "
        "--overwrite-newer-checkpoints")
