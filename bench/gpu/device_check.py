#!/usr/bin/env python
"""The device check behind bench/gpu/check.sh: pretrain_t2v.py on one device, end to end, with figures.

    python bench/gpu/device_check.py --out DIR          # cuda: 8.5B-width SUV, reduced depth, video-stage latents
    python bench/gpu/device_check.py --dry --out DIR    # cpu: the same steps at tiny sizes (CI)

1. data: the sample videos (tools/make_sample_dataset.py) encoded into a feature cache by the stub encoders with
   the real encoders' shapes (WF-VAE: 32 channels, 4x temporal / 8x spatial; T5-XXL 2048-d, 512 tokens;
   CLIP 1280-d pooled), so each sample is a video-stage latent;
2. reference: `--steps` bf16 steps of the skiparse model (k 1, 2, 4, 8, 4, 2, 1), timed;
3. exact resume: `--steps / 2` steps and a save, then a run resumed from it to `--steps`; the resumed losses
   must equal the reference's bitwise (TensorBoard float32 scalars);
4. dense: the same model with every k = 1 for a few steps, for the skiparse vs dense step-time ratio.
Writes results.json (step time, MFU, peak memory, the ratio, the attention backend, resume check) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
H200_BF16_PEAK_TFLOPS = 989.0  # dense bf16 tensor-core peak without sparsity (H100 / H200 SXM datasheet)
SKIPARSE_K = [1, 2, 4, 8, 4, 2, 1]

# video1 of examples/opensoraplan1.5/stages.yaml: 57 frames at 288 x 512 -> latent 32 x 15 x 36 x 64
FULL = {
    "model": {"num_layers": [1] * len(SKIPARSE_K), "num_heads": 24, "head_dim": 128},  # hidden 3072 as 8.5B
    "shape": {"resolution_mode": "forced", "height": 288, "width": 512, "num_frames": 57, "min_num_frames": 57,
              "fps": 24},
    "encoders": {"latent_channels": 32, "factors": (4, 8, 8), "text_dim": 2048, "text_len": 512,
                 "pooled_dim": 1280},
    "videos": 32, "dense_steps": 5,
    "flags": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
}
DRY = {
    "model": {"num_layers": [1] * len(SKIPARSE_K), "num_heads": 2, "head_dim": 16, "in_channels": 4,
              "out_channels": 4, "timestep_embed_dim": 32, "caption_channels": 16, "pooled_projection_dim": 8},
    "shape": {"resolution_mode": "forced", "height": 32, "width": 32, "num_frames": 9, "min_num_frames": 9,
              "fps": 8},
    "encoders": {"latent_channels": 4, "factors": (8, 8, 8), "text_dim": 16, "text_len": 12, "pooled_dim": 8},
    "videos": 8, "dense_steps": 2, "flags": [],
}


def make_data(work: Path, sizes: dict) -> Path:
    """Sample videos -> feature cache at the configured latent / text sizes; returns the data config path."""
    from megatron_video.configfile import from_mapping
    from megatron_video.data.cache_builder import build_cache, merge_index, stub_encoders
    from megatron_video.data.config import DataConfig
    from megatron_video.data.dataset import VideoDataset

    subprocess.run([sys.executable, str(REPO / "tools" / "make_sample_dataset.py"), "--out", str(work / "videos"),
                    "--num-videos", str(sizes["videos"]), "--num-images", "0"], check=True, cwd=REPO)
    data = {"metadata_paths": [str(work / "videos" / "data.txt")], "shape": dict(sizes["shape"], use_images=False),
            "num_workers": 0}
    dataset = VideoDataset.from_config(from_mapping(DataConfig, data).validate())
    video, text = stub_encoders(**sizes["encoders"])
    report = build_cache(dataset, work / "cache", video, text, latent_kind="mean")
    merge_index(work / "cache")
    if report.samples == 0:
        raise SystemExit("device check: no sample video is long enough for the configured shape")
    data["cache_path"] = str(work / "cache")
    path = work / "data.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def train(device: str, out: Path, name: str, steps: int, model: Path, data: Path, extra: list[str]) -> dict:
    """pretrain_t2v.py on one process; returns the TensorBoard scalars {tag: {step: value}} and the wall time."""
    tensorboard = out / "tb" / name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               str(REPO / "pretrain_t2v.py"), "--device", device, "--bf16", "--use-distributed-optimizer",
               "--model-config", str(model), "--data-config", str(data), "--train-iters", str(steps),
               "--micro-batch-size", "1", "--global-batch-size", "1", "--lr", "1e-4", "--ema-decay", "0",
               "--peak-tflops", str(H200_BF16_PEAK_TFLOPS), "--tensorboard-dir", str(tensorboard), *extra]
    started = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"device check: the {name} run failed (exit {code}); see {out / (name + '.log')}")
    return {"scalars": read_scalars(tensorboard), "wall_s": time.monotonic() - started}


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def step_seconds(scalars: dict[str, dict[int, float]], skip: int) -> float:
    """Median step time after `skip` warm-up steps (global batch 1: 1 / samples per second)."""
    rates = [v for step, v in sorted(scalars["samples_per_s"].items()) if step > skip]
    return statistics.median(1.0 / r for r in rates)


def model_config(path: Path, sizes: dict, ks: list[int]) -> Path:
    path.write_text(yaml.safe_dump(dict(sizes["model"], sparse_n=ks)))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="cpu, tiny sizes (what CI runs)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu" / "results")
    parser.add_argument("--steps", type=int, default=None, help="reference steps (default 20; dry 4)")
    args = parser.parse_args(argv)
    sizes, device = (DRY, "cpu") if args.dry else (FULL, "cuda")
    steps = args.steps or (4 if args.dry else 20)
    half, warmup = steps // 2, min(2, steps - 1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    data = make_data(work, sizes)
    skiparse = model_config(work / "skiparse.yaml", sizes, SKIPARSE_K)
    dense = model_config(work / "dense.yaml", sizes, [1] * len(SKIPARSE_K))
    # one learning-rate horizon for every run: the half run's schedule (saved in its checkpoint) is then the
    # uninterrupted run's, as a resumed job's must be (the default decay, linear, runs to --train-iters otherwise)
    flags = [*sizes["flags"], "--lr-decay-iters", str(steps)]

    reference = train(device, out, "reference", steps, skiparse, data, flags)
    first = train(device, out, "first_half", half, skiparse, data, [*flags, "--save", str(work / "ckpt")])
    resumed = train(device, out, "resumed", steps, skiparse, data, [*flags, "--load", str(work / "ckpt")])
    dense_run = train(device, out, "dense", sizes["dense_steps"], dense, data, flags)

    expected = {s: v for s, v in reference["scalars"]["loss"].items() if s > half}
    got = resumed["scalars"]["loss"]
    before = {s: v for s, v in reference["scalars"]["loss"].items() if s <= half}
    exact = got == expected and first["scalars"]["loss"] == before  # the first half is deterministic too
    ref = reference["scalars"]
    step_s = step_seconds(ref, warmup)
    dense_s = step_seconds(dense_run["scalars"], min(warmup, sizes["dense_steps"] - 1))
    results = {
        "device": device, "dry_run": args.dry, "steps": steps,
        "model": dict(sizes["model"], sparse_n=SKIPARSE_K), "latent_shape": _latent_shape(sizes),
        "attention_backend": _attention_backend(device),
        "step_time_s": step_s,
        "mfu": statistics.median(v for s, v in ref["mfu"].items() if s > warmup),
        "tflops_per_device": statistics.median(v for s, v in ref["tflops_per_device"].items() if s > warmup),
        "peak_memory_gib": max(ref["mem_gib"].values()),
        "skiparse_over_dense_step_time": step_s / dense_s,
        "dense_step_time_s": dense_s,
        "exact_resume": exact,
        "resume_losses": {"reference": expected, "resumed": got},
        "wall_s": {name: run["wall_s"] for name, run in
                   (("reference", reference), ("first_half", first), ("resumed", resumed), ("dense", dense_run))},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "resume_losses"}, indent=2))
    if not exact:
        print(f"FAIL: resumed losses {got} differ from the uninterrupted run's {expected}", file=sys.stderr)
        return 1
    print(f"PASS: results in {out / 'results.json'}")
    return 0


def _latent_shape(sizes: dict) -> list[int]:
    shape, enc = sizes["shape"], sizes["encoders"]
    ft, fh, fw = enc["factors"]
    return [enc["latent_channels"], 1 + (shape["num_frames"] - 1) // ft, shape["height"] // fh,
            shape["width"] // fw]


def _attention_backend(device: str) -> str:
    import torch

    from megatron_video.models.attention import select_backend

    return select_backend(torch.device(device), torch.bfloat16)


if __name__ == "__main__":
    sys.exit(main())
