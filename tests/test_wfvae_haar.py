"""Haar transforms: filter layout, sub-band/channel order, causal padding, round trip, and latent shapes."""

from __future__ import annotations

import pytest
import torch

from megatron_video.models.wfvae import WFVAE, WFVAEConfig, latent_shape
from megatron_video.models.wfvae.wavelet import HaarWavelet3D, InverseHaarWavelet3D, haar_filters

# The released filters hold the fp32 value of the literal 0.3536 (not 1/sqrt(8)).
HAAR_FP32 = float(torch.tensor(0.3536, dtype=torch.float32))
GAIN = 8 * HAAR_FP32**2  # 1.000264


def test_filter_values_and_signs() -> None:
    f = haar_filters(torch.float64)[:, 0]
    assert f.abs().unique().tolist() == [HAAR_FP32]
    # k = 4*bt + 2*bh + bw; the high filter is first minus second sample along its axis.
    for k in range(8):
        bt, bh, bw = k >> 2 & 1, k >> 1 & 1, k & 1
        assert f[k, 1, 0, 0] == f[k, 0, 0, 0] * (-1) ** bt
        assert f[k, 0, 1, 0] == f[k, 0, 0, 0] * (-1) ** bh
        assert f[k, 0, 0, 1] == f[k, 0, 0, 0] * (-1) ** bw
    assert (f[:, 0, 0, 0] > 0).all()


def test_round_trip_gain() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8, 12, dtype=torch.float64)
    y = InverseHaarWavelet3D().double()(HaarWavelet3D().double()(x))
    assert y.shape == x.shape
    torch.testing.assert_close(y, x * GAIN, rtol=0, atol=1e-12)
    assert abs(GAIN - 1.000264) < 1e-6
    assert (y - x).abs().max() > 1e-5  # the gain is real, not 1


def test_subband_major_channel_order_and_causal_front() -> None:
    t, h, w = 5, 4, 6
    tt = torch.arange(t, dtype=torch.float64).view(1, 1, t, 1, 1)
    ww = torch.arange(w, dtype=torch.float64).view(1, 1, 1, 1, w)
    # R varies along w only, G along t only, B constant.
    x = torch.cat([ww.expand(1, 1, t, h, w), tt.expand(1, 1, t, h, w), torch.ones(1, 1, t, h, w,
                                                                                  dtype=torch.float64)], 1)
    y = HaarWavelet3D().double()(x)
    assert y.shape == (1, 24, (t + 1) // 2, h // 2, w // 2)
    band = y.view(1, 8, 3, *y.shape[2:])  # out_channel = k * 3 + rgb
    nonzero = {(k, c) for k in range(8) for c in range(3) if band[0, k, c].abs().max() > 1e-12}
    # R: lll and w-high (k=1); G: lll and t-high (k=4, zero at t=0 since frame 0 is duplicated); B: lll.
    assert nonzero == {(0, 0), (1, 0), (0, 1), (4, 1), (0, 2)}
    assert band[0, 4, 1, 0].abs().max() == 0
    # High = first minus second: w increases, so the w-high band is negative.
    assert (band[0, 1, 0] < 0).all()
    # The lll band of the constant channel is 8 * 0.3536 everywhere.
    expected = torch.full_like(band[0, 0, 2], 8 * HAAR_FP32)
    torch.testing.assert_close(band[0, 0, 2], expected, rtol=0, atol=1e-12)


def test_odd_spatial_size_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        HaarWavelet3D()(torch.zeros(1, 3, 1, 5, 4))


@pytest.mark.parametrize("t,t_lat", [(1, 1), (9, 2), (17, 3), (57, 8), (121, 16)])
def test_latent_shape_rule(t: int, t_lat: int) -> None:
    assert latent_shape((2, 3, t, 576, 1024)) == (2, 32, t_lat, 72, 128)


@pytest.mark.parametrize("shape", [(1, 3, 8, 64, 64), (1, 3, 9, 60, 64), (1, 4, 9, 64, 64), (3, 9, 64, 64)])
def test_bad_video_shapes_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        latent_shape(shape)


def test_full_model_latent_shape_on_meta() -> None:
    """The released model maps 121x576x1024 to a 16x72x128 latent with 32 channels (shape-only run)."""
    with torch.device("meta"):
        model = WFVAE(WFVAEConfig.released())
        video = torch.empty(1, 3, 121, 576, 1024)
    with torch.no_grad():
        moments = model.encode_moments(video)
        latents = model.encode(video)
        decoded = model.decode(latents)
    assert moments.shape == (1, 64, 16, 72, 128)
    assert latents.shape == (1, 32, 16, 72, 128)
    assert decoded.shape == (1, 3, 121, 576, 1024)
