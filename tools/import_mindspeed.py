#!/usr/bin/env python
"""Translate a MindSpeed-MM / Open-Sora Plan fork v1.5 setup (model JSON, data JSON, launch script) into ours.

    python tools/import_mindspeed.py --mm-model pretrain_model.json --mm-data data.json --script pretrain.sh \\
        --out migrated/        # -> model.yaml, data.yaml, vae.json, launch_flags.txt, MIGRATION.txt
    python tools/import_mindspeed.py --flavour osp-fork --script pretrain_opensoraplan1_5.sh --out migrated/

Every upstream setting is either carried over (and where to) or listed with the reason it is left out
(MIGRATION.txt, also printed). A value we cannot reproduce is an error (exit 2) and nothing is written.
Checkpoints: `python -m checkpoints_convert import CKPT OUT --from mindspeed-mm|osp-fork` (see docs/MIGRATING.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.migrate import MigrationError  # noqa: E402
from megatron_video.migrate.run import FLAVOURS, migrate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mm-model", help="upstream model JSON (its --mm-model file)")
    p.add_argument("--mm-data", help="upstream data JSON (its --mm-data file)")
    p.add_argument("--script", help="upstream launch script (pretrain*.sh)")
    p.add_argument("--flavour", choices=FLAVOURS, default="mindspeed-mm",
                   help="whose files these are (default mindspeed-mm; osp-fork: the Open-Sora Plan fork)")
    p.add_argument("--out", required=True, type=Path, help="folder for the translated files")
    a = p.parse_args(argv)
    try:
        mig = migrate(a.out, a.mm_model, a.mm_data, a.script, a.flavour)
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(mig.report())
    if mig.flags:
        print(f"\nlaunch flags ({a.out / 'launch_flags.txt'}):\n  {' '.join(mig.flags)}")
    print(f"\nwrote {', '.join(sorted(p.name for p in a.out.iterdir()))} to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
