"""Diffusion objectives: shift values, σ distribution, masked loss, zero-terminal SNR, min-SNR, seeding."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_video.diffusion import (
    RectifiedFlow,
    RectifiedFlowConfig,
    VPrediction,
    VPredictionConfig,
    build_objective,
    dynamic_shift,
    make_betas,
    masked_mse,
    noise_generator,
    noise_seed,
    shift_sigma,
    spatial_tokens,
)


def test_dynamic_shift_released_resolutions():
    rf = RectifiedFlow()
    # 288x512 and 576x1024 videos through the 8x8x8 VAE: 36x64 and 72x128 latents.
    assert rf.shift_for(36, 64) == pytest.approx(1.74, abs=0.005)
    assert rf.shift_for(72, 128) == pytest.approx(2.33, abs=0.005)
    # The two anchor points of the line in mu.
    assert dynamic_shift(256) == pytest.approx(math.exp(0.5))
    assert dynamic_shift(4096) == pytest.approx(math.exp(1.15))
    assert spatial_tokens(36, 64) == 576
    assert RectifiedFlow(RectifiedFlowConfig(dynamic_shift=False)).shift_for(72, 128) == 1.0


def test_shift_sigma_maps_unit_interval():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = shift_sigma(sigma, 3.0)
    assert out[0] == 0 and out[-1] == 1
    assert out[2].item() == pytest.approx(0.75)  # 3·0.5 / (1 + 2·0.5)
    assert torch.all(out >= sigma)


def test_sigma_is_logit_normal_and_shifted():
    rf = RectifiedFlow()
    gen = torch.Generator().manual_seed(1234)
    sigma = rf.sample_sigma(20000, gen)
    z = torch.logit(sigma.double())
    assert z.mean().item() == pytest.approx(0.0, abs=0.03)
    assert z.std().item() == pytest.approx(1.0, abs=0.03)
    # Quantiles of the logit against the standard normal's.
    nd = statistics.NormalDist()
    for q in (0.1, 0.25, 0.75, 0.9):
        assert torch.quantile(z, q).item() == pytest.approx(nd.inv_cdf(q), abs=0.05)
    # After the shift the median moves from 1/2 to shift / (1 + shift).
    x0 = torch.zeros(4000, 1, 1, 36, 64)
    s = rf.sample(x0, torch.Generator().manual_seed(99))
    shift = rf.shift_for(36, 64)
    median = torch.median(s.timestep / 1000).item()
    assert median == pytest.approx(shift / (1 + shift), abs=0.02)
    assert bool(((s.timestep > 0) & (s.timestep < 1000)).all())


def test_rectified_flow_sample_formulas():
    rf = RectifiedFlow()
    x0 = torch.randn(3, 4, 2, 6, 8, generator=torch.Generator().manual_seed(0))
    s = rf.sample(x0, torch.Generator().manual_seed(5))
    sigma = (s.timestep / 1000).view(3, 1, 1, 1, 1)
    noise = s.target + x0  # target = ε − x0
    torch.testing.assert_close(s.x_t, sigma * noise + (1 - sigma) * x0)
    # The same generator stream gives σ first, then ε.
    gen = torch.Generator().manual_seed(5)
    raw = rf.sample_sigma(3, gen)
    eps = torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(s.timestep / 1000, shift_sigma(raw, rf.shift_for(6, 8)))
    torch.testing.assert_close(noise, eps, rtol=0, atol=1e-6)
    assert s.weight is None


@pytest.mark.parametrize("name", ["rectified_flow", "v_prediction"])
def test_determinism_and_no_global_rng(name):
    obj = build_objective(name)
    x0 = torch.randn(2, 4, 3, 4, 4)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = obj.sample(x0, noise_generator(7, 100, 1, 3))
    b = obj.sample(x0, noise_generator(7, 100, 1, 3))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG was not consumed
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.timestep, b.timestep)
    assert torch.equal(a.target, b.target)
    c = obj.sample(x0, noise_generator(7, 100, 1, 2))  # another DP rank
    assert not torch.equal(a.x_t, c.x_t)


def test_noise_seed_distinct_and_validated():
    seeds = {noise_seed(1, it, mb, dp) for it in range(4) for mb in range(3) for dp in range(4)}
    assert len(seeds) == 48
    assert all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(1, 2, 3, 4) == noise_seed(1, 2, 3, 4)
    with pytest.raises(ValueError, match="iteration"):
        noise_seed(1, -1, 0, 0)


def test_masked_loss_ignores_padding():
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 3, 2, 4, 4, generator=gen, requires_grad=True)
    target = torch.randn(2, 3, 2, 4, 4, generator=gen)
    mask = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    mask[1, 1, 2:, :] = False  # part of sample 1's last latent frame is padding
    loss = masked_mse(pred, target, mask)
    valid = mask.unsqueeze(1).expand_as(pred)
    expected = (pred - target)[valid].square().mean()
    torch.testing.assert_close(loss, expected)
    # Garbage at padded positions changes neither the loss nor the gradient elsewhere.
    pred2 = pred.detach().clone()
    pred2[~valid] = float("inf")
    pred2.requires_grad_(True)
    loss2 = masked_mse(pred2, target, mask)
    torch.testing.assert_close(loss2, expected.detach())
    loss2.backward()
    assert torch.isfinite(pred2.grad).all()
    assert torch.all(pred2.grad[~valid] == 0)
    # Per-sample weights.
    w = torch.tensor([2.0, 0.5])
    wl = masked_mse(pred, target, mask, w)
    err = (pred - target).square() * w.view(2, 1, 1, 1, 1)
    torch.testing.assert_close(wl, err[valid].mean())


def test_masked_loss_rejects_bad_shapes():
    pred = torch.zeros(2, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="valid_mask"):
        masked_mse(pred, pred, torch.ones(2, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="weight"):
        masked_mse(pred, pred, None, torch.ones(3))
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        RectifiedFlow().sample(torch.zeros(2, 3, 4, 4), torch.Generator())
    with pytest.raises(TypeError, match="Generator"):
        VPrediction().sample(torch.zeros(1, 1, 1, 2, 2), 1234)
    meta = torch.zeros(1, 1, 1, 2, 2, device="meta")
    with pytest.raises(ValueError, match="generator is on cpu"):
        RectifiedFlow().sample(meta, torch.Generator())


def test_zero_terminal_snr():
    vp = VPrediction()
    assert vp.alphas_cumprod[-1].item() == 0.0
    plain = torch.cumprod(1 - make_betas(VPredictionConfig()), 0)
    assert vp.alphas_cumprod[0].item() == pytest.approx(plain[0].item(), rel=1e-12)
    assert plain[-1].item() > 0  # the unrescaled schedule does not reach zero
    assert torch.all(vp.alphas_cumprod[1:] < vp.alphas_cumprod[:-1])  # strictly decreasing
    assert torch.all((vp.betas > 0) & (vp.betas <= 1))


def test_min_snr_weights():
    vp = VPrediction(VPredictionConfig(snr_gamma=5.0))
    t = torch.tensor([0, 10, 300, 700, 999])
    ab = vp.alphas_cumprod[t]
    snr = ab / (1 - ab)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    torch.testing.assert_close(vp.min_snr_weight(t), expected.float())
    assert vp.min_snr_weight(torch.tensor([999])).item() == 0.0  # SNR 0 at the terminal step
    # Where SNR < γ the weight is SNR/(SNR+1) = ᾱ; where SNR > γ it is γ/(SNR+1) < ᾱ.
    w = vp.min_snr_weight(t).double()
    assert torch.all(w <= ab + 1e-7)
    off = VPrediction(VPredictionConfig(snr_gamma=None))
    assert torch.equal(off.min_snr_weight(t), torch.ones(5))


def test_v_prediction_sample_formulas():
    vp = VPrediction()
    x0 = torch.randn(4, 2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    s = vp.sample(x0, torch.Generator().manual_seed(2))
    t = s.timestep.long()
    assert torch.equal(s.timestep, t.float()) and bool(((t >= 0) & (t < 1000)).all())
    ab = vp.alphas_cumprod[t].float().view(4, 1, 1, 1, 1)
    a, sg = ab.sqrt(), (1 - ab).sqrt()
    # Recover ε from x_t and check v = √ᾱ ε − √(1−ᾱ) x0.
    eps = torch.randn(x0.shape, generator=_after_randint(4))
    torch.testing.assert_close(s.x_t, a * x0 + sg * eps)
    torch.testing.assert_close(s.target, a * eps - sg * x0)
    torch.testing.assert_close(s.weight, vp.min_snr_weight(t))


def _after_randint(batch: int) -> torch.Generator:
    gen = torch.Generator().manual_seed(2)
    torch.randint(0, 1000, (batch,), generator=gen)
    return gen


def test_config_validation():
    with pytest.raises(ValueError, match="logit_std"):
        RectifiedFlowConfig(logit_std=0.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        VPredictionConfig(beta_schedule="cosine")
    with pytest.raises(ValueError, match="objective"):
        build_objective("edm")


def _peer_samples() -> dict:
    from megatron.core import parallel_state as mpu

    from megatron_video.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2)  # 4 ranks: TP = 2 x DP = 2
    x0 = torch.ones(2, 4, 3, 4, 4)  # every rank of a replica holds the same latents
    s = RectifiedFlow().sample(x0, noise_generator(11, 5, 0, mpu.get_data_parallel_rank()))
    return {"tp": mpu.get_tensor_model_parallel_rank(), "dp": mpu.get_data_parallel_rank(),
            "x_t": s.x_t, "t": s.timestep}


@pytest.mark.slow
def test_noise_identical_on_tp_peers_distinct_across_dp():
    from tests.harness import run_distributed

    res = run_distributed(_peer_samples, 4)
    by_dp = {}
    for r in res:
        by_dp.setdefault(r["dp"], []).append(r)
    assert sorted(by_dp) == [0, 1] and all(len(v) == 2 for v in by_dp.values())
    for peers in by_dp.values():
        assert torch.equal(peers[0]["x_t"], peers[1]["x_t"]) and torch.equal(peers[0]["t"], peers[1]["t"])
    assert not torch.equal(by_dp[0][0]["t"], by_dp[1][0]["t"])
