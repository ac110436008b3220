"""Adapters from the model-side encoders (WF-VAE, T5 + CLIP) to the feature-cache encoder protocol.

Latent kinds stored in a cache:
    "moments" (default): [normalised posterior mean ; std * scale] on the channel axis (2C channels), so
                         training can draw a fresh normalised sample every epoch (`sample_cached_latent`);
    "mean":              the normalised posterior mean (deterministic);
    "sample":            one normalised posterior sample (what OSP v1.5 trains on, frozen at cache time).
"""

from __future__ import annotations

from typing import Any

import torch

LATENT_KINDS = ("moments", "mean", "sample")


def wfvae_encoder(vae: Any, kind: str = "moments", chunk_size: int | None = None,
                  generator: torch.Generator | None = None) -> Any:
    """video (B, 3, T, H, W) in [-1, 1] -> cached latent tensor of `kind` for a `models.wfvae.WFVAE`."""
    if kind not in LATENT_KINDS:
        raise ValueError(f"latent kind must be one of {LATENT_KINDS}, got {kind!r}")

    @torch.no_grad()
    def encode(video: torch.Tensor) -> torch.Tensor:
        post = vae.posterior(video, chunk_size)
        if kind == "sample":
            return vae.normalize(post.sample(generator))
        mean = vae.normalize(post.mode())
        if kind == "mean":
            return mean
        return torch.cat([mean, post.std * vae.latent_scale.to(post.std.dtype)], dim=1)

    return encode


def sample_cached_latent(stored: torch.Tensor, kind: str, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """The normalised latent to train on from a cached tensor ((C, ...) or (B, C, ...)) of `kind`."""
    if kind != "moments":
        return stored
    dim = 0 if stored.dim() == 4 else 1
    mean, std = stored.chunk(2, dim=dim)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + std * noise


def text_encoder(encoders: Any) -> Any:
    """captions -> (t5 hidden, t5 mask, clip pooled) for a `models.text_encoders.TextEncoders`."""

    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = encoders.encode(list(captions))
        return emb.t5_hidden, emb.t5_mask, emb.clip_pooled

    return encode


def tokenizers(encoders: Any) -> dict[str, Any]:
    """Tokenizer callables for `captions.tokenize_captions` / `collate_samples` (keys t5_*, clip_*)."""

    def wrap(tok: Any) -> Any:
        def run(captions: list[str]) -> dict[str, torch.Tensor]:
            ids, mask = tok.tokenize(list(captions))
            return {"input_ids": ids, "attention_mask": mask}

        return run

    return {"t5": wrap(encoders.t5), "clip": wrap(encoders.clip)}
