"""The training data path: dataset (decoded videos or the feature cache), the shape-safe sampler, the loader,
and the frozen encoders that turn a decoded micro-batch into the denoiser's inputs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from megatron_video.data.config import DataConfig
from megatron_video.data.sampler import ShapeBatchSampler


@dataclass
class DataPipeline:
    dataset: Any
    sampler: ShapeBatchSampler
    loader: Any


def build_data(args: argparse.Namespace, data_config: DataConfig, dp_rank: int, dp_size: int) -> DataPipeline:
    from megatron_video.data.cache import FeatureCacheDataset
    from megatron_video.data.dataset import VideoDataset
    from megatron_video.data.loader import build_dataloader

    if data_config.cache_path:
        dataset = FeatureCacheDataset(data_config.cache_path, data_config)
        keys = dataset.shape_keys
    elif _has_bucket_index(data_config):  # checked by preflight; records then read on demand
        dataset = VideoDataset.from_index(data_config)
        keys = dataset.sampler_keys
    else:
        dataset = VideoDataset.from_config(data_config)
        keys = dataset.shape_keys
    sampler = ShapeBatchSampler(
        keys, global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size,
        dp_rank=dp_rank, dp_size=dp_size, seed=data_config.seed,
        min_bucket_batches=data_config.batch.min_bucket_batches, drop_last=data_config.batch.drop_last,
    )
    loader = build_dataloader(dataset, sampler, num_workers=data_config.num_workers)
    return DataPipeline(dataset, sampler, loader)


def _has_bucket_index(data_config: DataConfig) -> bool:
    """tools/plan_buckets.py wrote a bucket index for the one Parquet metadata file: the dataset memory-maps it
    (the same order and resume fingerprint as planning in memory) and reads each record on demand."""
    from megatron_video.data.bucket_index import index_paths

    paths = data_config.metadata_paths
    return len(paths) == 1 and paths[0].endswith(".parquet") and index_paths(paths[0])[0].exists()


class BatchEncoder:
    """Decoded micro-batch -> (clean latents x0, T5 states, T5 mask, CLIP pooled), under no_grad.

    Batches read from the feature cache already hold the encodings; otherwise the frozen WF-VAE and text
    encoders run here (every rank of a model replica sees the same samples, so they agree)."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.device = device
        self.vae = self.text = None
        self.vae_chunk = args.vae_chunk_size
        self.keep_video = False  # pass the decoded video on (inpainting encodes a masked copy of it)
        if args.vae_path:
            import json
            from pathlib import Path

            from megatron_video.models.wfvae import WFVAEConfig, load_wfvae

            # --vae-config is a JSON file path (upstream "ae" dict or our field names); default: released
            config = WFVAEConfig.from_dict(json.loads(Path(args.vae_config).read_text())) if args.vae_config else None
            self.vae = load_wfvae(args.vae_path, config).to(device).eval()
        if args.t5_path or args.clip_path:
            from megatron_video.models.text_encoders import TextEncoders

            self.text = TextEncoders.from_pretrained(args.t5_path, args.clip_path, dtype=torch.float32,
                                                     device=device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "latent" in batch:
            x0 = batch["latent"]
        elif self.vae is not None:
            x0 = self.vae.encode(batch["video"].to(self.device), chunk_size=self.vae_chunk, sample=False)
        else:
            raise RuntimeError("the batch has no cached latents and no --vae-path/--vae-config was given")
        if "t5_hidden" in batch and "clip_pooled" in batch:
            t5, mask, pooled = batch["t5_hidden"], batch["t5_mask"], batch["clip_pooled"]
        elif self.text is not None:
            t5, mask, pooled = tuple(self.text.encode(batch["caption"]))
        else:
            raise RuntimeError("the batch has no cached text embeddings and no --t5-path/--clip-path was given")
        to = dict(device=self.device)
        # every caption fills the text length: read from the host copy (a cache batch), never from the device
        all_valid = mask.device.type == "cpu" and bool(mask.all())
        return {"x0": x0.to(**to).float(), "t5_hidden": t5.to(**to), "t5_mask": mask.to(**to),
                "t5_all_valid": all_valid,
                "clip_pooled": pooled.to(**to), "sample_id": batch["sample_id"],
                "sampler_position": batch.get("sampler_position"),
                **({"video": batch["video"]} if self.keep_video and "video" in batch else {}),
                **({"structure": batch["structure"]} if "structure" in batch else {})}  # a cached control signal
