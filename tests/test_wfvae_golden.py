"""The WF-VAE reproduces the upstream golden vector (tiny config, fp32) to <= 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_video.models.wfvae import WFVAE, DiagonalGaussian, WFVAEConfig
from megatron_video.models.wfvae.wavelet import haar_filters

TOL = 1e-4


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, torch.Tensor]:
    path = golden_dir / "wfvae_tiny_fp32.safetensors"
    return load_file(str(path))


@pytest.fixture(scope="module")
def model(golden: dict[str, torch.Tensor], golden_dir: Path) -> WFVAE:
    meta = json.loads((golden_dir / "wfvae_tiny_fp32.json").read_text())
    cfg = WFVAEConfig.from_dict(meta["tiny_config"])
    assert cfg == WFVAEConfig.tiny()
    m = WFVAE(cfg).eval()
    state = {k.removeprefix("state_dict."): v for k, v in golden.items() if k.startswith("state_dict.")}
    m.load_state_dict(state, strict=True)
    return m


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_haar_filters_equal_released_values(golden: dict[str, torch.Tensor]) -> None:
    ours = haar_filters()
    names = ("h", "g", "hh", "gh", "h_v", "g_v", "hh_v", "gh_v")
    prefix = "state_dict.encoder.wavelet_transform_in"
    theirs = torch.cat([golden[f"{prefix}.{n}_conv.conv.weight"] for n in names])
    inverse = torch.cat([golden[f"state_dict.decoder.inverse_wavelet_transform_out.{n}"] for n in names])
    assert torch.equal(ours, theirs) and torch.equal(ours, inverse)


def test_golden_encoder(model: WFVAE, golden: dict[str, torch.Tensor]) -> None:
    video = golden["inputs.video"]
    with torch.no_grad():
        coeffs = model.encoder.wavelet_transform_in(video)
        post = model.posterior(video)
        moments = model.encode_moments(video)
        tiled = model.encode_moments(video, chunk_size=8)
        torch.manual_seed(777)
        sample = model.encode(video)
    errs = {
        "wavelet_in_coeffs": _max_err(coeffs, golden["intermediate.wavelet_in_coeffs"]),
        "encoder_moments": _max_err(moments, golden["outputs.encoder_moments"]),
        "latent_mean": _max_err(post.mean, golden["outputs.latent_mean"]),
        "latent_logvar_clamped": _max_err(post.logvar, golden["outputs.latent_logvar_clamped"]),
        "latent_mean_normalized": _max_err(model.normalize(post.mode()),
                                           golden["outputs.latent_mean_normalized"]),
        "latent_sample_normalized_seed777": _max_err(sample,
                                                     golden["outputs.latent_sample_normalized_seed777"]),
        "encoder_moments_tiled": _max_err(tiled, golden["outputs.encoder_moments_tiled"]),
    }
    print("golden encoder max abs errors:", errs)
    assert max(errs.values()) <= TOL, errs


def test_golden_sample_noise_matches_upstream_rng(golden: dict[str, torch.Tensor]) -> None:
    post = DiagonalGaussian(golden["outputs.latent_mean"], golden["outputs.latent_logvar_clamped"])
    torch.manual_seed(777)
    noise = post.sample() - post.mean
    assert _max_err(noise / post.std, golden["outputs.sample_noise_seed777"]) <= TOL


def test_golden_decoder(model: WFVAE, golden: dict[str, torch.Tensor]) -> None:
    mean = golden["outputs.latent_mean"]
    with torch.no_grad():
        decoded = model.decode_raw(mean)
        tiled = model.decode_raw(mean, chunk_size=2)
        via_norm = model.decode(model.normalize(mean))
    errs = {
        "decoded": _max_err(decoded, golden["outputs.decoded"]),
        "decoded_tiled": _max_err(tiled, golden["outputs.decoded_tiled"]),
        "decode(normalize(mean))": _max_err(via_norm, golden["outputs.decoded"]),
    }
    print("golden decoder max abs errors:", errs)
    assert max(errs.values()) <= TOL, errs
