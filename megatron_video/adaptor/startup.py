"""Device set-up from the command line, before anything imports megatron, and MindSpeed's own flags.

On Ascend, `mindspeed.megatron_adaptor` patches megatron-core (fused optimizer, apex, amp_C) when it is imported,
and a megatron module imported before it keeps the unpatched code. Argument parsing loads the model package (and
with it megatron-core), so the entry points read `--device` first and set up the backend, then parse.

MindSpeed reads its feature flags (e.g. `--optimizer-selection`) from sys.argv itself; with `--device npu` our
parser lets exactly those through (the list is data: mindspeed_flags.txt, with its source).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_video.adaptor.base import DEVICES, DeviceBackend, DeviceUnavailableError, detect_default_device

_FLAGS_FILE = Path(__file__).with_name("mindspeed_flags.txt")


def preparse_device(argv: Sequence[str] | None = None) -> str | None:
    """The `--device` value on the command line, or None if absent or not a device name (the full parser then
    reports it)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--device", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    return known.device if known.device in DEVICES else None


def setup_device_from_argv(argv: Sequence[str] | None = None) -> DeviceBackend | None:
    """Set up the device backend named by `--device` (default: detected) before any megatron import.
    A device that cannot be used ends the process with one message (from rank 0) and exit code 2.
    `--help` needs no device (and stays fast): nothing is set up and None is returned."""
    from megatron_video.adaptor.base import active_backend, setup_device

    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        return None
    name = preparse_device(argv)
    if name is None and active_backend() is not None:
        return active_backend()
    try:
        return setup_device(name)
    except DeviceUnavailableError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@functools.lru_cache(maxsize=1)
def mindspeed_flags() -> frozenset[str]:
    """MindSpeed core_r0.16.0's own command-line flags (see mindspeed_flags.txt for the source)."""
    lines = (line.split("#", 1)[0].strip() for line in _FLAGS_FILE.read_text().splitlines())
    return frozenset(line for line in lines if line)


def unknown_flags(extras: Sequence[str], device: str | None) -> tuple[list[str], list[str]]:
    """Split what a strict parser did not recognise into (passed to MindSpeed, rejected). With `--device npu`
    (or none given on a machine whose default is npu) MindSpeed's flags and their values pass; all else is
    rejected."""
    if not extras:
        return [], []
    on_npu = (device or detect_default_device()) == "npu"
    passed: list[str] = []
    rejected: list[str] = []
    target = rejected
    for token in extras:
        if token.startswith("-"):
            target = passed if on_npu and token.split("=", 1)[0] in mindspeed_flags() else rejected
        target.append(token)  # a value goes where its flag went
    return passed, rejected
