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
    from megatron_video.data.bucket_index import planned_metadata
    from megatron_video.data.cache import FeatureCacheDataset
    from megatron_video.data.dataset import VideoDataset
    from megatron_video.data.loader import build_dataloader

    if data_config.cache_path:
        dataset = FeatureCacheDataset(data_config.cache_path, data_config)
        keys = dataset.shape_keys
    elif planned_metadata(data_config.metadata_paths):  # checked by preflight; records then read on demand
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


class BatchEncoder:
    """Decoded micro-batch -> (clean latents x0, T5 states, T5 mask, CLIP pooled), under no_grad.

    Batches read from the feature cache already hold the encodings. Otherwise the frozen WF-VAE and text
    encoders run once per model replica, on its `FirstStageSource` rank (the only rank that loads them), and the
    features go to the replica's other ranks: all of them to the TP/CP peers of the first pipeline stage, which
    embeds them; the latents (the last stage's loss target) and the text mask (every stage's attention) to the
    later stages, which see the text states and CLIP vector only by shape.

    Latents are a draw from the VAE posterior, as OSP v1.5 trained: mean + std * noise with the noise of each
    sample seeded by (data seed, sample id, epoch), the draw a "moments" feature cache makes, so it is the same
    on every rank of a replica and after a resume."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        from megatron_video.parallel.broadcast import FirstStageSource

        self.device = device
        self.vae = self.text = None
        self.has_vae, self.has_text = bool(args.vae_path), bool(args.t5_path or args.clip_path)
        self.vae_chunk = args.vae_chunk_size
        data_config = getattr(args, "data_config", None)
        self.seed = data_config.seed if data_config is not None else 0
        self.keep_video = False  # pass the decoded video on (inpainting encodes a masked copy of it)
        self.source = FirstStageSource(device)
        if not self.source.is_source():
            return
        if self.has_vae:
            import json
            from pathlib import Path

            from megatron_video.models.wfvae import WFVAEConfig, load_wfvae

            # --vae-config is a JSON file path (upstream "ae" dict or our field names); default: released
            config = WFVAEConfig.from_dict(json.loads(Path(args.vae_config).read_text())) if args.vae_config else None
            self.vae = load_wfvae(args.vae_path, config).to(device).eval()
        if self.has_text:
            from megatron_video.models.text_encoders import TextEncoders

            self.text = TextEncoders.from_pretrained(args.t5_path, args.clip_path, dtype=torch.float32,
                                                     device=device)

    def posterior_sample(self, batch: dict[str, Any]) -> torch.Tensor:
        """x0 of the batch's videos: one posterior draw per sample, seeded by (seed, sample id, epoch)."""
        from megatron_video.data.cache import hash_seed
        from megatron_video.data.encoders import sample_cached_latent, wfvae_encoder

        moments = wfvae_encoder(self.vae, "moments", self.vae_chunk)(batch["video"].to(self.device))
        position = batch.get("sampler_position")
        epoch = int(position[0]) if position is not None else 0
        draws = []
        for stored, sid in zip(moments, batch["sample_id"]):
            gen = torch.Generator(device=stored.device).manual_seed(hash_seed(self.seed, int(sid), epoch))
            draws.append(sample_cached_latent(stored, "moments", gen))
        return torch.stack(draws)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        need_latent = "latent" not in batch
        need_text = not ("t5_hidden" in batch and "clip_pooled" in batch)
        if need_latent and not self.has_vae:
            raise RuntimeError("the batch has no cached latents and no --vae-path/--vae-config was given")
        if need_text and not self.has_text:
            raise RuntimeError("the batch has no cached text embeddings and no --t5-path/--clip-path was given")
        encoded: list[torch.Tensor] | None = None
        if (need_latent or need_text) and self.source.is_source():
            encoded = [self.posterior_sample(batch)] if need_latent else []
            if need_text:
                encoded += list(self.text.encode(batch["caption"]))
        if need_latent or need_text:  # latents and mask: read on later pipeline stages; states, pooled: shapes
            later = [True] * need_latent + [False, True, False] * need_text
            encoded = self.source.share(encoded, len(later), later)
        x0 = encoded.pop(0) if need_latent else batch["latent"]
        t5, mask, pooled = encoded if need_text else (batch["t5_hidden"], batch["t5_mask"], batch["clip_pooled"])
        to = dict(device=self.device)
        # every caption fills the text length: read from the host copy (a cache batch), never from the device
        all_valid = mask.device.type == "cpu" and bool(mask.all())
        # text from the feature cache: every rank of the replica reads the same host mask (trim_text_padding)
        host_mask = mask if not need_text and mask.device.type == "cpu" else None
        return {"x0": x0.to(**to).float(), "t5_hidden": t5.to(**to), "t5_mask": mask.to(**to),
                "t5_all_valid": all_valid, "t5_mask_host": host_mask,
                "clip_pooled": pooled.to(**to), "sample_id": batch["sample_id"],
                "sampler_position": batch.get("sampler_position"),
                **({"video": batch["video"]} if self.keep_video and "video" in batch else {}),
                **({"structure": batch["structure"]} if "structure" in batch else {})}  # a cached control signal

    def shared_vae(self) -> SharedVAE:
        """The WF-VAE as InpaintConditioner calls it, run on the source rank and shared like the latents."""
        return SharedVAE(self)


def trim_text_padding(micro_batches: list[dict[str, Any]]) -> None:
    """Cut the T5 states and mask of this rank's micro-batches of one global batch to the last text position any
    of their captions uses. The positions cut are masked keys of every sample in every block, so the denoiser
    computes the same video tokens (the cache pads captions to 512 tokens; most use far fewer): attention runs
    over fewer keys and, where every caption then fills the length, without a mask (flash kernels eligible).
    One length for all the micro-batches, as the pipeline's p2p shapes are fixed per global batch; every rank of a
    replica (TP, CP, PP) reads the same micro-batches and cuts alike. Only from host masks of cached text
    (`t5_mask_host`): micro-batches without one keep their length, and nothing is read from a device."""
    hosts = [mb.get("t5_mask_host") for mb in micro_batches]
    if not hosts or any(host is None for host in hosts):
        return
    used = torch.cat([host.reshape(host.shape[0], -1) for host in hosts]).any(0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    for mb, host in zip(micro_batches, hosts):
        if mb["t5_hidden"].shape[1] > length:
            mb["t5_hidden"], mb["t5_mask"] = mb["t5_hidden"][:, :length], mb["t5_mask"][:, :length]
        mb["t5_all_valid"] = bool(host[:, :length].all())


class SharedVAE:
    """`encode(video, chunk_size=..., sample=False)`: the posterior mean of `video`, computed on the replica's
    source rank and broadcast (every rank of the replica passes the same video)."""

    def __init__(self, encoder: BatchEncoder) -> None:
        self.encoder = encoder

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, chunk_size: int | None = None, sample: bool = False) -> torch.Tensor:
        if sample:
            raise ValueError("a shared encode is the posterior mean (sample=False); seed draws per sample instead")
        enc = self.encoder
        latents = None
        if enc.source.is_source():
            latents = [enc.vae.encode(video.to(enc.device), chunk_size=chunk_size, sample=False)]
        return enc.source.share(latents, 1, [True])[0]
