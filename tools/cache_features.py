#!/usr/bin/env python
"""Build the feature cache (VAE latents + T5/CLIP text embeddings) for a data set, sharded and resumable.

    python tools/cache_features.py --data-config data.yaml --out CACHE --encoders pkg.module:make_encoders
    torchrun --nproc-per-node 8 tools/cache_features.py ...          # rank r builds shards r::world

`--encoders` names a factory `f(data_config) -> (video_encoder | None, text_encoder | None)` with
video_encoder(video (B, 3, T, H, W) in [-1, 1]) -> latents and
text_encoder(list[str]) -> (t5 hidden (B, L, D), t5 mask (B, L), clip pooled (B, P));
`stub` uses small deterministic stand-ins (for dry runs and tests).
`--structure canny|depth|sketch` also stores the structure controller's input signal of each clip
(control/signals.py; depth / sketch models from local paths only).
Finished shards are skipped, so rerunning after an interruption only does the rest.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_video.control.signals import add_signal_source_args  # noqa: E402
from megatron_video.data.cache_builder import build_cache, merge_index, stub_encoders  # noqa: E402
from megatron_video.data.config import DataConfig  # noqa: E402
from megatron_video.data.dataset import VideoDataset  # noqa: E402
from megatron_video.tool_errors import run_tool  # noqa: E402
from megatron_video.training.preflight import check_metadata  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_data_config(path: str) -> DataConfig:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return DataConfig.from_dict(data).validate()


def load_encoders(spec: str, config: DataConfig, a: argparse.Namespace) -> tuple[Any, Any]:
    if spec == "stub":
        return stub_encoders()
    if spec == "osp":  # the released WF-VAE + T5/CLIP from local directories
        from megatron_video.data.encoders import text_encoder, wfvae_encoder
        from megatron_video.models.text_encoders import TextEncoders
        from megatron_video.models.wfvae import load_wfvae

        if not (a.vae_path or a.t5_path):
            raise ValueError("--encoders osp needs --vae-path and/or --t5-path with --clip-path")
        vae = load_wfvae(a.vae_path, dtype=DTYPES[a.encoder_dtype]) if a.vae_path else None
        text = (TextEncoders.from_pretrained(a.t5_path, a.clip_path, dtype=DTYPES[a.encoder_dtype],
                                             t5_max_length=config.caption.max_length_t5,
                                             clip_max_length=config.caption.max_length_clip)
                if a.t5_path else None)
        return (wfvae_encoder(vae, a.latent_kind) if vae is not None else None,
                text_encoder(text) if text is not None else None)
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"--encoders must be 'stub', 'osp' or 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)(config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-config", required=True, help="DataConfig JSON/YAML")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--encoders", default="stub", help="stub | osp | module:function")
    p.add_argument("--vae-path", help="WF-VAE checkpoint (--encoders osp)")
    p.add_argument("--t5-path", help="T5 encoder directory (--encoders osp)")
    p.add_argument("--clip-path", help="CLIP text model directory (--encoders osp)")
    p.add_argument("--encoder-dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--latent-kind", choices=["moments", "mean", "sample"], default=None,
                   help="what the video encoder returns (default: moments for osp, mean otherwise)")
    p.add_argument("--what", choices=["both", "latents", "text"], default="both")
    p.add_argument("--structure", default=None, metavar="KIND",
                   help="also cache the structure controller's signal: canny, depth or sketch")
    add_signal_source_args(p)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = load_data_config(a.data_config)
    check_metadata(config)  # a missing metadata file is named before any encoder loads
    if a.structure is not None:
        from megatron_video.control.signals import check_signal_source, signal_extractor

        try:
            check_signal_source(a.structure, a.structure_model, a.structure_sketch_arch)
        except ValueError as exc:
            raise SystemExit(f"--structure: {exc}") from None
    if a.encoders == "stub":
        a.latent_kind = "mean"
    elif a.latent_kind is None:
        a.latent_kind = "moments" if a.encoders == "osp" else "mean"
    video_enc, text_enc = load_encoders(a.encoders, config, a)
    if a.what == "latents":
        text_enc = None
    elif a.what == "text":
        video_enc = None
    structure = (signal_extractor(a.structure, a.structure_model, a.structure_sketch_arch)
                 if a.structure is not None else None)
    dataset = VideoDataset.from_config(config)
    t0 = time.perf_counter()
    report = build_cache(dataset, a.out, video_enc, text_enc, a.shard_size, a.rank, a.world_size,
                         a.batch_size, DTYPES[a.dtype], a.latent_kind, structure, a.structure)
    distributed = a.world_size > 1 and "MASTER_ADDR" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()  # every rank's shards are on disk before the index is merged
    merged = merge_index(a.out) if a.rank == 0 else False
    print(f"rank {a.rank}: {report.shards_done} shards written, {report.shards_skipped} already done, "
          f"{time.perf_counter() - t0:.1f} s; {report.summary()}" + ("; index.parquet written" if merged else ""))
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
