#!/usr/bin/env python
"""Export the structure controller of a pretrain_control.py checkpoint to a released-style safetensors file.

    python tools/export_control.py CKPT_DIR --out controller.safetensors [--weights ema] [--iteration N]

Names and metadata: megatron_video/control/export.py (docs/DESIGN.md §15). Load it for sampling with
`tools/sample.py --controller FILE --structure-video VIDEO`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.tool_errors import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a pretrain_control.py --save directory or one iter_XXXXXXX directory")
    p.add_argument("--out", required=True, help="the safetensors file to write")
    p.add_argument("--weights", choices=("model", "ema"), default="model", help="the model or the EMA weights")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    a = p.parse_args(argv)
    from checkpoints_convert.ours import CheckpointFormatError
    from megatron_video.control.export import export_controller
    from megatron_video.training.checkpointing import CheckpointError

    try:
        out = export_controller(a.checkpoint, a.out, a.weights, a.iteration)
    except (CheckpointFormatError, CheckpointError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
