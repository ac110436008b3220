"""Adapters from the WF-VAE and the T5/CLIP pair to the feature cache, with tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_video.data.cache import FeatureCacheDataset
from megatron_video.data.cache_builder import build_cache
from megatron_video.data.captions import tokenize_captions
from megatron_video.data.dataset import VideoDataset
from megatron_video.data.encoders import sample_cached_latent, text_encoder, tokenizers, wfvae_encoder
from tests.data_fixtures import sample_dataset_dir, tiny_config  # noqa: F401
from tests.encoder_fixtures import build_tiny_clip, build_tiny_t5, random_wfvae


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return random_wfvae(dtype=torch.float32)


def test_wfvae_latent_kinds(vae: torch.nn.Module) -> None:
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    mean = wfvae_encoder(vae, "mean")(x)
    torch.testing.assert_close(mean, vae.encode(x, sample=False))
    moments = wfvae_encoder(vae, "moments")(x)
    assert moments.shape == (1, 64, 2, 2, 3)
    torch.testing.assert_close(moments[:, :32], mean)
    # a moments draw is distributed like the VAE's own normalised sample: same mean/std per element
    post = vae.posterior(x)
    expect_std = post.std * vae.latent_scale
    torch.testing.assert_close(moments[:, 32:], expect_std)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    z = sample_cached_latent(moments, "moments", g1)
    noise = torch.randn(mean.shape, generator=g2)
    torch.testing.assert_close(z, mean + expect_std * noise)
    torch.testing.assert_close(sample_cached_latent(moments[0], "moments", torch.Generator().manual_seed(1)),
                               z[0])
    with pytest.raises(ValueError, match="latent kind"):
        wfvae_encoder(vae, "bogus")


def test_cache_with_wfvae_moments(vae: torch.nn.Module, sample_dataset_dir: Path,  # noqa: F811
                                  tmp_path: Path) -> None:
    # images only (T = 1) at 64 x 64 / 48 x 64 keep the tiny VAE fast
    cfg = tiny_config(sample_dataset_dir, shape={"use_videos": False, "spatial_stride": 16})
    ds = VideoDataset.from_config(cfg)
    out = tmp_path / "cache"
    build_cache(ds, out, wfvae_encoder(vae, "moments"), None, shard_size=4, dtype=torch.float32,
                latent_kind="moments")
    cache = FeatureCacheDataset(out, cfg)
    sid = int((cache.shape_keys >= 0).nonzero()[0][0])
    a, b, c = cache[(sid, 0)], cache[(sid, 0)], cache[(sid, 1)]
    _, h, w = a["shape"]
    assert a["latent"].shape == (32, 1, h // 8, w // 8)
    torch.testing.assert_close(a["latent"], b["latent"])  # same (id, epoch): same draw (resume, peers)
    assert not torch.equal(a["latent"], c["latent"])  # fresh draw next epoch
    mean = vae.encode(ds.load(sid, 0)["video"][None], sample=False)[0]
    assert (a["latent"] - mean).abs().mean() < 3 * (c["latent"] - a["latent"]).abs().mean() + 1e-6


def test_text_adapters(tmp_path: Path) -> None:
    from megatron_video.models.text_encoders import TextEncoders

    enc = TextEncoders.from_pretrained(build_tiny_t5(tmp_path / "t5"), build_tiny_clip(tmp_path / "clip"),
                                       dtype=torch.float32, t5_max_length=16, clip_max_length=16)
    hidden, mask, pooled = text_encoder(enc)(["a cat sits on a red mat", ""])
    assert hidden.shape[:2] == mask.shape == (2, 16) and pooled.shape[0] == 2
    assert mask[0].sum() > mask[1].sum() >= 1
    toks = tokenize_captions(["a cat sits on a red mat"], tokenizers(enc))
    assert set(toks) == {"t5_input_ids", "t5_attention_mask", "clip_input_ids", "clip_attention_mask"}
    assert toks["t5_input_ids"].shape == (1, 16)
