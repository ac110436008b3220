#!/usr/bin/env python
"""Data at scale with a planned bucket index (issue 21): per row count, on synthetic Parquet metadata,

- planning time (tools/plan_buckets.py's `plan_bucket_index`, streamed by row group, --workers processes),
- set-up time from the index in a fresh process (memory-map + sampler), its peak RSS over the imports,
- time to the first micro-batch of sample ids,
- the training dataset's set-up in a fresh process: records read on demand over the index
  (`VideoDataset.from_index`) against today's in-memory path (`VideoDataset.from_config`, which loads every
  row's numeric columns and plans shapes), with peak RSS over the imports and the first micro-batch's records,

and a linear projection of the planning time and index size to 1.1B rows.

    python bench/bench_data_index.py --rows 10000000 100000000 [--workers 2] [--workdir DIR] [--skip-dataset]
        [--in-memory-max-rows N] [--delete]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SHAPE = {"max_tokens": 65536, "num_frames": 121, "min_num_frames": 29,  # valid for DataConfig.validate (stride 8)
         "temporal_buckets": [1, 33, 57, 97, 121]}
REPORT_ROWS = 1_100_000_000


def _setup_child(path: str, gbs: int, mbs: int, dp: int) -> None:
    """Runs in a fresh interpreter: set-up from the index, the first micro-batch, peak RSS over imports."""
    import resource

    from megatron_video.data.bucket_index import load_bucket_index
    from megatron_video.data.config import DataConfig
    from megatron_video.data.sampler import ShapeBatchSampler

    def rss(kind: str) -> float:  # MiB; RssAnon: private memory, RssFile: mapped file pages (page cache, shared)
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(kind + ":"))
        return int(line.split()[1]) / 1024

    base, anon0, file0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss("RssAnon"), rss("RssFile")
    cfg = DataConfig.from_dict({"shape": SHAPE}).shape
    t0 = time.perf_counter()
    members = load_bucket_index(path, cfg)
    sampler = ShapeBatchSampler(members, gbs, mbs, dp - 1, dp, seed=1, min_bucket_batches=4)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    first = next(iter(sampler))
    first_s = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"setup_from_index_s": round(setup, 3), "first_micro_batch_s": round(first_s, 4),
                      "first_ids": first[:2], "buckets": len(sampler.bucket_keys),
                      "samples_per_epoch": sampler.samples_per_epoch, "rss_after_imports_mib": round(base),
                      "peak_rss_over_imports_mib": round(peak - base, 1),
                      "private_rss_growth_mib": round(rss("RssAnon") - anon0, 1),
                      "mapped_file_rss_growth_mib": round(rss("RssFile") - file0, 1),
                      "load_average_1min": os.getloadavg()[0]}))


def _dataset_child(path: str, on_demand: bool, gbs: int, mbs: int, dp: int) -> None:
    """Runs in a fresh interpreter: the training dataset + sampler set-up and the first micro-batch's records
    (decoding is left out: the synthetic paths name no files), peak RSS over the RSS after the imports."""
    import pyarrow.compute  # noqa: F401  (imported on first use by a record read: a one-time ~0.8 s, not per read)
    import pyarrow.parquet  # noqa: F401

    from megatron_video.data.config import DataConfig
    from megatron_video.data.dataset import VideoDataset
    from megatron_video.data.sampler import ShapeBatchSampler

    def status(kind: str) -> float:  # MiB
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(kind + ":"))
        return int(line.split()[1]) / 1024

    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS (Linux >= 4.0)
    base, anon0 = status("VmRSS"), status("RssAnon")
    config = DataConfig.from_dict({"metadata_paths": [path], "shape": SHAPE})
    t0 = time.perf_counter()
    ds = VideoDataset.from_index(config) if on_demand else VideoDataset.from_config(config)
    keys = ds.sampler_keys
    sampler = ShapeBatchSampler(keys, gbs, mbs, dp - 1, dp, seed=1, min_bucket_batches=4)
    setup = time.perf_counter() - t0
    after_setup, anon_setup = status("VmRSS") - base, status("RssAnon") - anon0
    t1 = time.perf_counter()
    records = [ds.metadata.record(i) for i in next(iter(sampler))]
    first = time.perf_counter() - t1
    print(json.dumps({"setup_s": round(setup, 3), "first_records_s": round(first, 4), "records": len(records),
                      "rss_after_setup_over_imports_mib": round(after_setup, 1),
                      "private_rss_after_setup_over_imports_mib": round(anon_setup, 1),
                      "peak_rss_over_imports_mib": round(status("VmHWM") - base, 1),
                      "private_rss_after_first_batch_over_imports_mib": round(status("RssAnon") - anon0, 1),
                      "rss_after_imports_mib": round(base), "load_average_1min": os.getloadavg()[0]}))


def _child(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_dataset(path: Path, in_memory: bool) -> dict:
    """The training dataset's set-up over `path`: on demand from the index vs (`in_memory`) today's in-memory
    path, each in a fresh process."""
    out = {}
    for name, on_demand in (("on_demand", True), ("in_memory", False))[:2 if in_memory else 1]:
        r = _child(f"import bench_data_index as b; b._dataset_child({str(path)!r}, {on_demand}, 1024, 2, 64)")
        out.update({f"{name}_{k}": v for k, v in r.items()})
    return out


def write_tiled(path: Path, rows: int, chunk: int, workers: int) -> float:
    """`path`: one `chunk`-row synthetic chunk repeated (paths made distinct per copy), and its bucket index
    written from the chunk's planned keys repeated (the planning a full run would do gives the same keys).
    Returns the chunk's planning time scaled to `rows`."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from bench_data import write_synthetic_parquet

    from megatron_video.data.bucket_index import (
        EXCLUDED,
        index_paths,
        metadata_identity,
        plan_bucket_index,
        write_bucket_index,
    )
    from megatron_video.data.config import DataConfig
    from megatron_video.data.convert import PARQUET_ROW_GROUP
    from megatron_video.data.parquet_footer import footer_layout

    if rows % chunk:
        raise SystemExit(f"--tile: {rows} rows is not a multiple of the {chunk}-row chunk")
    cfg = DataConfig.from_dict({"shape": SHAPE}).shape
    base = path.with_name(f"chunk_{chunk}.parquet")
    if not base.exists():
        write_synthetic_parquet(base, chunk)
    t0 = time.perf_counter()
    head = plan_bucket_index(str(base), cfg, workers=workers)
    plan_s = (time.perf_counter() - t0) * rows / chunk
    codes = np.load(index_paths(base)[1]).astype(np.int64)
    keys = np.append(np.array(head["bucket_keys"], np.int64), -1)[np.where(codes == EXCLUDED, -1, codes)]
    t0 = time.perf_counter()
    table = pq.read_table(base)
    with pq.ParquetWriter(str(path), table.schema) as writer:
        for k in range(rows // chunk):
            paths = pc.binary_join_element_wise(f"tile{k:05d}/", table.column("path"), "")
            writer.write_table(table.set_column(0, "path", paths), row_group_size=PARQUET_ROW_GROUP)
    print(f"wrote {rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    t0 = time.perf_counter()
    identity = metadata_identity(path)
    layout = footer_layout(path)
    scan = time.perf_counter() - t0
    write_bucket_index(str(path), cfg, (keys for _ in range(rows // chunk)), layout, identity)
    print(f"footer layout scan {scan:.1f} s, index written in {time.perf_counter() - t0 - scan:.1f} s", flush=True)
    return plan_s


def bench(work: Path, rows: int, workers: int, tile: int = 0) -> dict:
    from bench_data import write_synthetic_parquet

    from megatron_video.data.bucket_index import index_paths, plan_bucket_index
    from megatron_video.data.config import DataConfig

    path = work / f"synthetic_{rows}.parquet"
    if tile:
        plan_s = write_tiled(path, rows, tile, workers)
        head = json.loads(index_paths(path)[0].read_text())
    else:
        if not path.exists():
            t0 = time.perf_counter()
            write_synthetic_parquet(path, rows)
            print(f"wrote {rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        t0 = time.perf_counter()
        head = plan_bucket_index(str(path), DataConfig.from_dict({"shape": SHAPE}).shape, workers=workers)
        plan_s = time.perf_counter() - t0
    index_bytes = sum(p.stat().st_size for p in index_paths(path))
    footer = head["footer"]
    r = _child(f"import bench_data_index as b; b._setup_child({str(path)!r}, 1024, 2, 64)")
    return {"rows": rows, "workers": workers, "plan_s": round(plan_s, 1), "planning": "scaled from the chunk"
            if tile else "measured", "index_mib": round(index_bytes / 2**20),
            "metadata_mib": round(path.stat().st_size / 2**20), "footer_mib": round(footer["length"] / 2**20, 1),
            "row_groups": footer["row_groups"], **r}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="kept between runs (default: a temp dir)")
    p.add_argument("--skip-dataset", action="store_true", help="leave out the training dataset's set-up")
    p.add_argument("--in-memory-max-rows", type=int, default=4_000_000,
                   help="also time today's in-memory path up to this many rows (it loads every row)")
    p.add_argument("--delete", action="store_true", help="delete each synthetic file and its index after use")
    p.add_argument("--tile", type=int, default=0, metavar="CHUNK",
                   help="build each file by repeating one CHUNK-row synthetic chunk (distinct paths) and its index "
                        "from the chunk's planned keys; planning time is the chunk's, scaled")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for rows in a.rows:
            r = bench(work, rows, a.workers, a.tile)
            scale = REPORT_ROWS / rows
            print(f"{rows:,} rows: planning {r['plan_s']} s ({r['planning']}) on {a.workers} process(es) (1.1B "
                  f"projected {r['plan_s'] * scale / 3600:.1f} h on as many), index {r['index_mib']} MiB (1.1B: "
                  f"{r['index_mib'] * scale / 1024:.1f} GiB on disk, memory-mapped); set-up from the index "
                  f"{r['setup_from_index_s']} s, peak RSS {r['peak_rss_over_imports_mib']} MiB over the imports "
                  f"(private RSS grew {r['private_rss_growth_mib']} MiB, mapped index pages "
                  f"{r['mapped_file_rss_growth_mib']} MiB), "
                  f"first micro-batch {r['first_micro_batch_s']} s; {r['buckets']} buckets; load average "
                  f"{r['load_average_1min']:.1f} on {os.cpu_count()} cores")
            print(json.dumps(r), flush=True)
            if not a.skip_dataset:
                d = bench_dataset(work / f"synthetic_{rows}.parquet", rows <= a.in_memory_max_rows)
                print(f"{rows:,} rows, training dataset + sampler set-up: on demand from the index "
                      f"{d['on_demand_setup_s']} s, RSS after set-up {d['on_demand_rss_after_setup_over_imports_mib']} "
                      f"MiB over the imports (peak {d['on_demand_peak_rss_over_imports_mib']} MiB), first "
                      f"micro-batch's {d['on_demand_records']} records {d['on_demand_first_records_s']} s"
                      + (f"; in memory (today's path) {d['in_memory_setup_s']} s, "
                         f"{d['in_memory_peak_rss_over_imports_mib']} MiB" if "in_memory_setup_s" in d else "")
                      + f"; load average {os.getloadavg()[0]:.1f}")
                print(json.dumps(d), flush=True)
            if a.delete:
                from megatron_video.data.bucket_index import index_paths

                path = work / f"synthetic_{rows}.parquet"
                chunk = work / f"chunk_{a.tile}.parquet"
                for f in (path, *index_paths(path), chunk, *index_paths(chunk)):
                    f.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
