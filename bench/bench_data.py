#!/usr/bin/env python
"""Data-pipeline benchmark.

1. Sampler set-up for N synthetic Parquet metadata rows (default 10M): read the numeric columns, plan every
   sample's T x H x W, build the shape-bucketed sampler, and draw the first epoch's order; wall time per
   phase and peak RSS, measured in a fresh process.
2. Decode throughput on the sample data set (tools/make_sample_dataset.py): clips/s of one worker.

    python bench/bench_data.py [--rows 10000000] [--decode-seconds 20] [--workdir DIR]
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


def write_synthetic_parquet(path: Path, rows: int, seed: int = 0) -> None:
    """Realistic mix: 80% videos (various resolutions, fps, lengths, some cuts/crops), 20% images."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_video.data.convert import PARQUET_ROW_GROUP, parquet_schema

    rng = np.random.default_rng(seed)
    res = np.array([(720, 1280), (1080, 1920), (480, 854), (1280, 720), (1080, 1080), (768, 1024),
                    (1024, 768), (360, 640), (2160, 3840), (540, 960)], np.int32)
    fps_choices = np.array([24, 25, 30, 60, 23.976, 29.97])
    captions = pa.array([f"caption template {i}: a scene with things moving around." for i in range(1000)])
    schema = parquet_schema()
    chunk = 1 << 20
    with pq.ParquetWriter(str(path), schema) as writer:
        for lo in range(0, rows, chunk):
            n = min(chunk, rows - lo)
            r = res[rng.integers(0, len(res), n)]
            img = rng.random(n) < 0.2
            nf = rng.integers(30, 600, n).astype(np.int32)
            has_cut = ~img & (rng.random(n) < 0.3)
            cs = np.where(has_cut, rng.integers(0, 10, n), 0).astype(np.int32)
            ce = np.where(has_cut, np.maximum(cs + 1, nf - rng.integers(0, 10, n)), 0).astype(np.int32)
            has_crop = rng.random(n) < 0.1
            ids = np.arange(lo, lo + n)
            paths = pa.array([f"shard{i // 100000:03d}/clip_{i:09d}.{'jpg' if m else 'mp4'}"
                              for i, m in zip(ids.tolist(), img.tolist())])
            cap = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)),
                                           captions.take(pa.array(rng.integers(0, 1000, n))))

            def opt(values: np.ndarray, mask: np.ndarray) -> pa.Array:
                return pa.array(values, mask=~mask)

            table = pa.Table.from_arrays([
                paths, cap, pa.array(r[:, 0]), pa.array(r[:, 1]), opt(nf, ~img),
                opt(fps_choices[rng.integers(0, len(fps_choices), n)], ~img), pa.array(img),
                pa.array(rng.uniform(3, 7, n)), pa.array(rng.uniform(0, 30, n)), pa.nulls(n, pa.string()),
                opt(cs, has_cut), opt(ce, has_cut),
                opt(np.full(n, 8, np.int32), has_crop), opt(r[:, 1] - 8, has_crop),
                opt(np.full(n, 8, np.int32), has_crop), opt(r[:, 0] - 8, has_crop)], schema=schema)
            writer.write_table(table, row_group_size=PARQUET_ROW_GROUP)


def _setup_child(path: str, gbs: int, mbs: int, dp: int) -> None:
    """Runs in a fresh interpreter: phases of the sampler set-up, then peak RSS."""
    import resource

    from megatron_video.data.config import ShapeConfig
    from megatron_video.data.metadata import load_metadata
    from megatron_video.data.sampler import ShapeBatchSampler
    from megatron_video.data.shapes import plan_shapes

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = {}
    t0 = time.perf_counter()
    meta = load_metadata(path)
    times["read_metadata_columns_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    plan = plan_shapes(meta.columns, ShapeConfig(max_tokens=65536, num_frames=121, min_num_frames=29,
                                                 temporal_buckets=[1, 29, 57, 93, 121]))
    times["plan_shapes_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    sampler = ShapeBatchSampler(plan.keys, gbs, mbs, 0, dp, seed=1, min_bucket_batches=4)
    times["sampler_init_s"] = time.perf_counter() - t2
    times["setup_total_s"] = time.perf_counter() - t0
    t3 = time.perf_counter()
    first = next(iter(sampler))
    times["first_epoch_order_s"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    meta.record(int(first[0]))
    times["first_record_read_s"] = time.perf_counter() - t4
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss / 1024
    times["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    times["load_average_1min"] = os.getloadavg()[0]
    print(json.dumps({**{k: round(v, 3) for k, v in times.items()}, "rows": len(meta),
                      "planned": int((plan.keys >= 0).sum()), "buckets": len(sampler.bucket_keys),
                      "samples_per_epoch": sampler.samples_per_epoch, "peak_rss_mib": round(peak),
                      "rss_after_imports_mib": round(base), "peak_rss_over_imports_mib": round(peak - base)}))


def bench_setup(workdir: Path, rows: int) -> dict:
    path = workdir / f"synthetic_{rows}.parquet"
    if not path.exists():
        t0 = time.perf_counter()
        write_synthetic_parquet(path, rows)
        print(f"wrote {rows:,} synthetic rows to {path} ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'bench')!r}); "
            f"import bench_data; bench_data._setup_child({str(path)!r}, 1024, 2, 64)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_decode(workdir: Path, seconds: float) -> list[dict]:
    from megatron_video.data.config import DataConfig
    from megatron_video.data.dataset import VideoDataset

    sys.path.insert(0, str(REPO / "tools"))
    import make_sample_dataset

    data = workdir / "sample_data"
    if not (data / "data.txt").exists():
        make_sample_dataset.make(data, num_videos=32, num_images=8, seed=0)
    results = []
    settings = {
        "minmax 64x64 budget, <=17 frames @8fps": {"shape": {"max_tokens": 4096, "spatial_stride": 4,
                                                             "num_frames": 17, "min_num_frames": 9,
                                                             "fps": 8}},
        "forced 144x256, <=33 frames @24fps": {"shape": {"resolution_mode": "forced", "height": 144,
                                                         "width": 256, "num_frames": 33,
                                                         "min_num_frames": 17, "fps": 24}},
    }
    for name, raw in settings.items():
        cfg = DataConfig.from_dict({"metadata_paths": [str(data / "data.txt")], **raw}).validate()
        ds = VideoDataset.from_config(cfg)
        ids = [i for i in range(len(ds)) if ds.shape_keys[i] >= 0 and not ds.metadata.columns.is_image[i]]
        n, frames, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            s = ds[(ids[n % len(ids)], n // len(ids))]
            n, frames = n + 1, frames + s["shape"][0]
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        results.append({"setting": name, "clips_per_s_per_worker": round(n / dt, 1),
                        "frames_per_s": round(frames / dt, 1), "clips": n,
                        "clips_per_cpu_s": round(n / cpu, 1), "load_average_1min": os.getloadavg()[0]})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--decode-seconds", type=float, default=20.0)
    p.add_argument("--workdir", type=Path, default=None, help="kept between runs (default: a temp dir)")
    p.add_argument("--skip-setup", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not a.skip_setup:
            r = bench_setup(work, a.rows)
            print(f"sampler set-up, {r['rows']:,} rows: {r['setup_total_s']:.1f} s total "
                  f"(read columns {r['read_metadata_columns_s']:.1f} s, "
                  f"plan shapes {r['plan_shapes_s']:.1f} s, sampler {r['sampler_init_s']:.1f} s); "
                  f"first epoch order {r['first_epoch_order_s']:.1f} s; "
                  f"peak RSS {r['peak_rss_mib']} MiB ({r['peak_rss_over_imports_mib']} MiB over the "
                  f"{r['rss_after_imports_mib']} MiB after imports); {r['buckets']} buckets, "
                  f"{r['samples_per_epoch']:,} samples/epoch; process CPU {r['process_cpu_s']:.1f} s "
                  f"(machine load average {r['load_average_1min']:.1f} on {os.cpu_count()} cores)")
            print(json.dumps(r))
        if not a.skip_decode:
            for r in bench_decode(work, a.decode_seconds):
                print(f"decode [{r['setting']}]: {r['clips_per_s_per_worker']} clips/s per worker "
                      f"({r['frames_per_s']} frames/s, {r['clips']} clips; {r['clips_per_cpu_s']} clips per "
                      f"CPU-second; load average {r['load_average_1min']:.1f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
