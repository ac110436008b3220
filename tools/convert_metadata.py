#!/usr/bin/env python
"""Convert data-set metadata between the Open-Sora Plan JSON form (data.txt / annotation .json) and Parquet.

    python tools/convert_metadata.py --to parquet data.txt [more.json ...] --out meta.parquet
    python tools/convert_metadata.py --to json meta.parquet --out DIR  # DIR/annotation.json + data.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.data.convert import json_to_parquet, parquet_to_json  # noqa: E402
from megatron_video.data.metadata import MetadataError  # noqa: E402
from megatron_video.tool_errors import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", help="data.txt / annotation .json files, or one .parquet file")
    p.add_argument("--to", choices=["parquet", "json"], required=True)
    p.add_argument("--out", required=True, type=Path, help="output .parquet file (--to parquet) or folder")
    p.add_argument("--data-root", default="", help="root for relative paths in .json/.parquet inputs")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if a.to == "parquet":
            if any(s.endswith(".parquet") for s in a.sources):
                p.error("--to parquet takes data.txt / .json inputs")
            n = json_to_parquet(a.sources, a.out, a.data_root)
            print(f"wrote {n} rows to {a.out} in {time.perf_counter() - t0:.1f} s")
        else:
            if len(a.sources) != 1 or not a.sources[0].endswith(".parquet"):
                p.error("--to json takes exactly one .parquet input")
            print(f"wrote {parquet_to_json(a.sources[0], a.out, a.data_root)}")
    except MetadataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
