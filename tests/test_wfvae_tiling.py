"""Causal-cache chunked encode/decode equals direct encode/decode (the "lossless tiling" claim), including the
frame counts and chunk sizes the upstream auto-selection rejects, with no state left on the modules."""

from __future__ import annotations

import pytest
import torch

from megatron_video.models.wfvae import WFVAE, CausalState

from .encoder_fixtures import random_wfvae

FP64_TOL = 1e-12


@pytest.fixture(scope="module")
def model() -> WFVAE:
    return random_wfvae(dtype=torch.float64)


def _video(t: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, 16, 16, generator=g, dtype=dtype) * 2 - 1


def _attrs(model: torch.nn.Module) -> dict[str, set[str]]:
    return {name: set(vars(m)) for name, m in model.named_modules()}


@pytest.mark.parametrize("t", [1, 9, 17, 25])
def test_chunked_encode_equals_direct(model: WFVAE, t: int) -> None:
    x = _video(t, seed=t)
    with torch.no_grad():
        direct = model.encode_moments(x)
        for chunk in (8, 16):
            chunked = model.encode_moments(x, chunk_size=chunk)
            assert chunked.shape == direct.shape == (1, 64, (t - 1) // 8 + 1, 2, 2)
            assert (chunked - direct).abs().max() <= FP64_TOL, (t, chunk)


@pytest.mark.parametrize("t_lat", [1, 2, 3, 4])
def test_chunked_decode_equals_direct(model: WFVAE, t_lat: int) -> None:
    g = torch.Generator().manual_seed(100 + t_lat)
    z = torch.randn(1, 32, t_lat, 2, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        direct = model.decode_raw(z)
        assert direct.shape == (1, 3, 8 * (t_lat - 1) + 1, 16, 16)
        # chunk 1 and chunks leaving a 1-frame tail both fail upstream.
        for chunk in (1, 2, 3):
            chunked = model.decode_raw(z, chunk_size=chunk)
            assert chunked.shape == direct.shape
            assert (chunked - direct).abs().max() <= FP64_TOL, (t_lat, chunk)


def test_interleaved_lengths_and_no_module_state(model: WFVAE) -> None:
    """Different lengths in one process, two streams interleaved chunk by chunk, nothing left on modules."""
    before = _attrs(model)
    a, b = _video(17, seed=1), _video(9, seed=2)
    with torch.no_grad():
        direct_a, direct_b = model.encode_moments(a), model.encode_moments(b)
        state_a, state_b = CausalState(), CausalState()
        out_a = [model.encoder(a[:, :, :1], state_a)]
        out_b = [model.encoder(b[:, :, :1], state_b)]
        state_a.first = state_b.first = False
        out_a.append(model.encoder(a[:, :, 1:9], state_a))
        out_b.append(model.encoder(b[:, :, 1:9], state_b))
        out_a.append(model.encoder(a[:, :, 9:17], state_a))
        assert (torch.cat(out_a, 2) - direct_a).abs().max() <= FP64_TOL
        assert (torch.cat(out_b, 2) - direct_b).abs().max() <= FP64_TOL
        # A longer video after a shorter one through the public API.
        for x in (b, a, _video(25, seed=3)):
            assert (model.encode_moments(x, chunk_size=8) - model.encode_moments(x)).abs().max() <= FP64_TOL
            z = model.encode_moments(x)[:, :32]
            assert (model.decode_raw(z, chunk_size=2) - model.decode_raw(z)).abs().max() <= FP64_TOL
    assert _attrs(model) == before


def test_fp32_chunked_matches_direct_to_round_off() -> None:
    model = random_wfvae(dtype=torch.float32, seed=5)
    x = _video(17, seed=7, dtype=torch.float32)
    with torch.no_grad():
        lat = model.encode(x, sample=False)
        lat_chunked = model.encode(x, sample=False, chunk_size=8)
        video = model.decode(lat)
        video_chunked = model.decode(lat, chunk_size=1)
    assert (lat - lat_chunked).abs().max() <= 1e-5
    assert (video - video_chunked).abs().max() <= 1e-5


def test_sampling_is_seeded_and_uses_std(model: WFVAE) -> None:
    x = _video(9, seed=11)
    with torch.no_grad():
        s1 = model.encode(x, generator=torch.Generator().manual_seed(3))
        s2 = model.encode(x, generator=torch.Generator().manual_seed(3))
        s3 = model.encode(x, generator=torch.Generator().manual_seed(4))
        mode = model.encode(x, sample=False)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert not torch.equal(s1, mode)


@pytest.mark.parametrize("chunk", [0, 4, 12, -8])
def test_bad_encode_chunk_rejected(model: WFVAE, chunk: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode_moments(_video(9, seed=0), chunk_size=chunk)


def test_bad_decode_inputs_rejected(model: WFVAE) -> None:
    with pytest.raises(ValueError, match="positive"):
        model.decode_raw(torch.zeros(1, 32, 2, 2, 2, dtype=torch.float64), chunk_size=0)
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="8n\\+1"):
        model.encode(torch.zeros(1, 3, 10, 16, 16))


def test_half_precision_runs_close_to_fp32() -> None:
    model = random_wfvae(dtype=torch.float32, seed=9)
    x = _video(9, seed=4, dtype=torch.float32)
    with torch.no_grad():
        ref = model.encode(x, sample=False)
        model_bf16 = model.to(torch.bfloat16)
        lat = model_bf16.encode(x, sample=False, chunk_size=8)
        video = model_bf16.decode(lat, chunk_size=1)
    assert lat.dtype == video.dtype == torch.bfloat16
    assert video.shape == x.shape and torch.isfinite(video.float()).all()
    assert (lat.float() - ref).abs().max() < 0.1 * ref.abs().max()
