"""Conversion time and peak memory for the 8.5B SUV schema in bf16 (random weights, real shapes).

Every step runs as its own `python -m checkpoints_convert ...` process; this script samples its
/proc/<pid>/status every 0.1 s and reports wall time, peak RSS (VmHWM: anonymous + file-backed pages of the
memory-mapped inputs, which the kernel can drop at any time) and the sampled peak of anonymous memory
(RssAnon: what the process really holds). Round trips are checked bitwise at the end of each chain.

    python bench/bench_convert.py --workdir /tmp/bench_convert            # the full 8.5B (17 GB per copy)
    python bench/bench_convert.py --num-layers 1 1 1 --sparse-n 1 2 1      # full width, 3 blocks
    python bench/bench_convert.py --pt-source   # instead: a released-style .pt source (mmap) -> dist -> back

Needs about 4 copies of the model on disk (source, two checkpoints, one export); it stops early otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_step(name: str, argv: list[str]) -> dict[str, object]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "checkpoints_convert", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        for key, value in _status(proc.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{err[-3000:]}")
    row = {"step": name, "seconds": round(time.perf_counter() - start, 1),
           "peak_rss_gib": round(peak["VmHWM"] / 2**30, 2), "peak_anon_gib": round(peak["RssAnon"] / 2**30, 2),
           "peak_file_gib": round(peak["RssFile"] / 2**30, 2)}
    print(json.dumps(row), flush=True)
    return row


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from checkpoints_convert.tensorio import MappedSafetensors

    x, y = MappedSafetensors(a), MappedSafetensors(b)
    if set(x.keys()) != set(y.keys()):
        return False
    for key in x.keys():
        if not torch.equal(x.get(key), y.get(key)):
            return False
        x.release(key)
        y.release(key)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    parser.add_argument("--num-layers", type=int, nargs="+", default=None, help="blocks per stage (default: 8.5B)")
    parser.add_argument("--sparse-n", type=int, nargs="+", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--pt-source", action="store_true",
                        help="measure import from a .pt (as the released model_ema.pt) -> dist -> safetensors")
    args = parser.parse_args()

    import torch

    from checkpoints_convert.schema import released_schema
    from checkpoints_convert.synthetic import write_random_released
    from megatron_video.models.suv_mmdit import suv_config

    overrides = {}
    if args.num_layers:
        sparse = tuple(args.sparse_n or [1] * len(args.num_layers))
        overrides = {"num_layers": tuple(args.num_layers), "sparse_n": sparse}
    cfg = suv_config("osp-v1.5-8.5b", **overrides)
    params = sum(math.prod(s) for s in released_schema(cfg).values() if s)
    size = 2 * params
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    free = shutil.disk_usage(work).free
    print(json.dumps({"params": params, "bytes_bf16": size, "blocks": cfg.num_blocks, "disk_free_gib":
                      round(free / 2**30, 1)}), flush=True)
    if free < 4.2 * size:
        raise SystemExit(f"needs about {4.2 * size / 2**30:.0f} GiB free in {work}, has {free / 2**30:.0f} GiB; "
                         "use --num-layers for fewer blocks at full width")
    (work / "model.yaml").write_text(
        "preset: osp-v1.5-8.5b\n" + "".join(f"{k}: {list(v)}\n" for k, v in overrides.items()))
    config = ["--model-config", str(work / "model.yaml")]

    start = time.perf_counter()
    src = write_random_released(work / "src.safetensors", cfg, dtype=torch.bfloat16, fast=True,
                                pt=work / "src.pt" if args.pt_source else None)
    print(json.dumps({"step": "generate random bf16 source", "seconds": round(time.perf_counter() - start, 1)}),
          flush=True)
    if args.pt_source:
        src.unlink()
        src = work / "src.pt"
        results = {"bitwise_pt_dist_round_trip": pt_chain(src, work, config)}
    else:
        results = main_chain(src, work, config)
    print(json.dumps(results), flush=True)
    if not args.keep:
        shutil.rmtree(work)
    if not all(results.values()):
        raise SystemExit("round trip not bitwise")


def main_chain(src: Path, work: Path, config: list[str]) -> dict[str, bool]:
    run_step("import -> dist", ["import", str(src), str(work / "dist"), *config])
    run_step("export dist -> safetensors", ["export", str(work / "dist"), *config,
                                            "--safetensors", str(work / "out.safetensors")])
    ok_dist = same_tensors(src, work / "out.safetensors")
    shutil.rmtree(work / "dist")
    (work / "out.safetensors").unlink()
    run_step("import -> legacy TP2 PP2", ["import", str(src), str(work / "tp2"), *config,
                                          "--format", "legacy", "--tp", "2", "--pp", "2"])
    run_step("reshard legacy TP2 PP2 -> TP4 PP1", ["reshard", str(work / "tp2"), str(work / "tp4"), "--tp", "4"])
    shutil.rmtree(work / "tp2")
    run_step("export legacy TP4 -> safetensors", ["export", str(work / "tp4"),
                                                  "--safetensors", str(work / "out.safetensors")])
    ok_legacy = same_tensors(src, work / "out.safetensors")
    return {"bitwise_dist_round_trip": ok_dist, "bitwise_legacy_round_trip": ok_legacy}


def pt_chain(src: Path, work: Path, config: list[str]) -> bool:
    import torch

    from checkpoints_convert.tensorio import MappedSafetensors

    run_step("import .pt -> dist", ["import", str(src), str(work / "dist"), *config])
    run_step("export dist -> safetensors", ["export", str(work / "dist"), *config,
                                            "--safetensors", str(work / "out.safetensors")])
    before = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    after = MappedSafetensors(work / "out.safetensors")
    tensors = {k: v for k, v in before.items() if v is not None}
    return set(tensors) == set(after.keys()) and all(torch.equal(v, after.get(k)) for k, v in tensors.items())


if __name__ == "__main__":
    main()
