"""WF-VAE encode (and decode) throughput and peak memory on this machine: direct vs causal-cache chunked,
tiny and full configs.

    python bench/bench_wfvae.py                      # encode: tiny 33x256x256, full 9x256x256
    python bench/bench_wfvae.py --full-frames 33 --repeats 1 --ops encode,decode

Weights are random (throughput does not depend on them). Every measurement runs in a fresh process. Peak
memory is the peak resident set (VmHWM, reset through /proc/self/clear_refs) during the first encode, above
the resident set just before it: activations and workspace, not the weights. Wall-clock throughput uses the
best of the timed repeats; "cpu s/clip" (process CPU time) is less sensitive to other load on the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.models.wfvae import WFVAE, WFVAEConfig, latent_shape  # noqa: E402

CONFIGS = {"tiny": WFVAEConfig.tiny, "full": WFVAEConfig.released}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_one(name: str, op: str, frames: int, size: int, batch: int, chunk: int | None,
            repeats: int) -> dict:
    """Measure one (config, op, mode) in this (fresh) process.

    Peak memory comes from the first call (afterwards the allocator keeps freed pages, hiding the peak);
    throughput from the following `repeats` calls (the first one also pays page faults).
    """
    torch.manual_seed(0)
    model = WFVAE(CONFIGS[name]()).eval()
    if op == "encode":
        video = torch.rand(batch, 3, frames, size, size) * 2 - 1
        run = lambda: model.encode(video, chunk_size=chunk)
    else:
        latents = torch.randn(latent_shape((batch, 3, frames, size, size)))
        run = lambda: model.decode(latents, chunk_size=chunk)
    with torch.no_grad():
        base = _status_kib("VmRSS")
        exact = _reset_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        first, first_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        peak_mib = (_status_kib("VmHWM") - base) / 1024 if exact else float("nan")
        times, cpu_times = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    best = min(times) if times else first
    cpu = min(cpu_times) if cpu_times else first_cpu
    return {"clips_per_s": batch / best, "first_s": first, "cpu_s_per_clip": cpu / batch, "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,full", help="comma list of: tiny, full")
    parser.add_argument("--frames", type=int, default=33, help="clip frames (8n+1) for the tiny config")
    parser.add_argument("--full-frames", type=int, default=9, help="clip frames (8n+1) for the full config")
    parser.add_argument("--size", type=int, default=256, help="clip height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=8, help="chunked-encode chunk size (multiple of 8)")
    parser.add_argument("--ops", default="encode", help="comma list of: encode, decode")
    parser.add_argument("--dec-chunk", type=int, default=2, help="chunked-decode chunk size (latent frames)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed calls after the first one (0: report the first call)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "config:op:mode"
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        name, op, mode = args.one.split(":")
        frames = args.frames if name == "tiny" else args.full_frames
        chunk = None if mode == "direct" else (args.chunk if op == "encode" else args.dec_chunk)
        print(json.dumps(run_one(name, op, frames, args.size, args.batch, chunk, args.repeats)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32, random weights, "
          f"batch {args.batch}")
    print(f"{'config':6} {'op':6} {'clip':>13} {'mode':>10} {'clips/s':>9} {'s/clip':>8} {'cpu s/clip':>10} "
          f"{'1st s':>7} {'peak MiB':>9}")
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {sorted(CONFIGS)}")
        frames = args.frames if name == "tiny" else args.full_frames
        for op, mode in itertools.product(args.ops.split(","), ("direct", "chunked")):
            if op not in ("encode", "decode"):
                raise SystemExit(f"unknown op {op!r}; choose from encode, decode")
            # A fresh process per measurement so peak memory is not hidden by an earlier run's pages.
            cmd = [sys.executable, __file__, "--one", f"{name}:{op}:{mode}", "--frames", str(args.frames),
                   "--full-frames", str(args.full_frames), "--size", str(args.size), "--batch",
                   str(args.batch), "--chunk", str(args.chunk), "--dec-chunk", str(args.dec_chunk),
                   "--repeats", str(args.repeats)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            chunk = args.chunk if op == "encode" else args.dec_chunk
            label = "direct" if mode == "direct" else f"chunk={chunk}"
            shape = f"{frames}x{args.size}x{args.size}"
            print(f"{name:6} {op:6} {shape:>13} {label:>10} {res['clips_per_s']:9.3f} {1 / res['clips_per_s']:8.2f} "
                  f"{res['cpu_s_per_clip']:10.2f} {res['first_s']:7.2f} {res['peak_mib']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
