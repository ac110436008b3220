#!/usr/bin/env python
"""Plan every metadata row's shape bucket once, offline, and write the bucket index next to the metadata.

    python tools/plan_buckets.py --metadata meta.parquet --data-config data.json [--workers 4]

Writes meta.parquet.buckets.npy (uint16 per row), meta.parquet.members.npy (row ids grouped by bucket),
meta.parquet.rowgroups.npy (where each row group lies in the Parquet footer, so training never decodes the whole
footer) and meta.parquet.buckets.json (settings, metadata identity, per-bucket counts); see
megatron_video/data/bucket_index.py.
Exit code 2 with one message on bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.data.metadata import MetadataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metadata", required=True, nargs="+", help="Parquet metadata file(s)")
    p.add_argument("--data-config", required=True, help="the training --data-config (its `shape` section)")
    p.add_argument("--workers", type=int, default=1, help="planning processes")
    p.add_argument("--rows-per-task", type=int, default=1 << 20, help="rows planned per task (by row group)")
    a = p.parse_args(argv)
    from megatron_video.arguments import ArgumentError, _load_data_config
    from megatron_video.data.bucket_index import plan_bucket_index

    try:
        cfg = _load_data_config(a.data_config).shape
        for meta in a.metadata:
            if not meta.endswith(".parquet") or not Path(meta).is_file():
                raise MetadataError(f"{meta}: not an existing .parquet metadata file")
            t0 = time.perf_counter()
            head = plan_bucket_index(meta, cfg, workers=a.workers, rows_per_task=a.rows_per_task)
            print(f"{meta}: {head['num_rows']} rows, {sum(head['bucket_counts'])} planned into "
                  f"{len(head['bucket_counts'])} buckets in {time.perf_counter() - t0:.1f} s")
    except (MetadataError, ArgumentError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
