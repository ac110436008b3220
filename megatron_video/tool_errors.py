"""How the command-line tools report bad input: one line on stderr, exit code 2, no traceback.

A traceback is for a bug; a missing file or a bad config is the user's to fix, and the line names it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_video.configfile import ConfigError
from megatron_video.training.preflight import PreflightError

# what a user's input causes (a missing or unreadable file, a bad config or metadata file)
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ConfigError, PreflightError)


def run_tool(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a tool's `main(argv)`; a user error, or a `SystemExit` carrying a message, becomes one line and 2."""
    from megatron_video.data.metadata import MetadataError

    prog = Path(sys.argv[0]).name
    try:
        return main(argv)
    except (*USER_ERRORS, MetadataError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if isinstance(exc.code, str):  # `raise SystemExit("message")` would exit 1
            print(exc.code if exc.code.startswith(prog) else f"{prog}: error: {exc.code}", file=sys.stderr)
            return 2
        raise
