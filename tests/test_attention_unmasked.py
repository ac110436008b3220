"""Attention without a mask when nothing is padded (masks of None: every token valid, known on the host): the
kernel is called with `key_valid=None` (so SDPA may take its flash kernel and flash-attn its dense path) and
the model's output and gradients equal the masked path's; padding of any kind still takes the mask path; the
decision reads nothing from the device.

Tolerances: fp32 on CPU; a key mask of all True and no mask give the same softmax, only the kernel's summation
order may differ (rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from megatron_video.models import attention as attn
from tests.harness import run_distributed

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _inputs(cfg, shape: tuple[int, int, int], text_len: int = 8, b: int = 2, seed: int = 3) -> dict:
    """A batch in which every latent and text token is valid, masks given as all-ones tensors."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = shape
    return {
        "hidden_states": torch.randn(b, cfg.in_channels, t, h, w, generator=g),
        "timestep": torch.tensor([250.0, 731.5])[:b],
        "encoder_hidden_states": torch.randn(b, 1, text_len, cfg.caption_channels, generator=g),
        "pooled_projections": torch.randn(b, 1, cfg.pooled_projection_dim, generator=g),
        "attention_mask": torch.ones(b, t, h, w, dtype=torch.long),
        "encoder_attention_mask": torch.ones(b, 1, text_len, dtype=torch.long),
    }


def _spy(model) -> list[tuple[int, bool]]:
    """Wrap every block's kernel: record (block k, whether it got no mask) per call, then run the kernel."""
    calls: list[tuple[int, bool]] = []
    for block in model.blocks:
        def spy(q, k, v, key_valid, *, scale, inner=block.attn.attn_fn, sparsity=block.spec.k):
            calls.append((sparsity, key_valid is None))
            return inner(q, k, v, key_valid, scale=scale)
        block.attn.attn_fn = spy
    return calls


def _run(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _compare(a, b) -> None:
    torch.testing.assert_close(a[0], b[0], **TOL)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **TOL, msg=name)


def _small_model(**flags):
    from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
    from megatron_video.models.suv_mmdit.config import megatron_config

    torch.manual_seed(0)
    cfg = suv_config("small")
    return cfg, SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True, **flags))


def test_all_valid_batch_runs_unmasked_and_equals_the_masked_path(tp1):
    from megatron_video.training.host_sync import HostSyncCounter

    cfg, model = _small_model()
    calls = _spy(model)
    inputs = _inputs(cfg, (3, 8, 8))  # 3 x 4 x 4 = 48 tokens: a multiple of every k^2 (1, 4, 16)
    masked = _run(model, inputs)
    assert calls and not any(unmasked for _, unmasked in calls)
    calls.clear()
    with HostSyncCounter() as syncs:
        unmasked = _run(model, {**inputs, "attention_mask": None, "encoder_attention_mask": None})
    assert len(calls) == cfg.num_blocks and all(unmasked for _, unmasked in calls), calls
    assert syncs.total == 0, syncs.counts
    _compare(unmasked, masked)


def test_padding_keeps_the_mask(tp1):
    """Skiparse padding masks exactly the blocks whose k^2 does not divide N; caption padding masks all."""
    cfg, model = _small_model()
    calls = _spy(model)
    inputs = _inputs(cfg, (3, 6, 4))  # 3 x 3 x 2 = 18 tokens: k = 2 and k = 4 pad, k = 1 does not
    masked = _run(model, inputs)
    calls.clear()
    unmasked = _run(model, {**inputs, "attention_mask": None, "encoder_attention_mask": None})
    assert sorted(set(calls)) == [(1, True), (2, False), (4, False)], calls
    _compare(unmasked, masked)
    calls.clear()
    text_mask = inputs["encoder_attention_mask"].clone()
    text_mask[1, 0, 6:] = 0
    model(**{**inputs, "attention_mask": None, "encoder_attention_mask": text_mask})
    assert len(calls) == cfg.num_blocks and not any(unmasked for _, unmasked in calls)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """Stand-in honouring flash-attention's flash_attn/flash_attn_interface.py `flash_attn_func(q, k, v,
    dropout_p, softmax_scale, causal)`: q/k/v (batch, seqlen, heads, head_dim), output the same as q."""
    assert q.dim() == 4 and q.shape[0] == k.shape[0] and dropout_p == 0.0 and not causal
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_flash_runs_its_dense_path_without_a_mask(monkeypatch):
    def varlen(*args, **kwargs):
        raise AssertionError("the varlen kernel was called with every key valid")

    monkeypatch.setitem(sys.modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=varlen))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, 2, 3, 8, generator=g) for s in (5, 7, 7))  # (S, B, heads, d)
    expected = attn._sdpa(q, k, v, torch.ones(2, 7, dtype=torch.bool), 0.3)
    torch.testing.assert_close(attn._flash_varlen(q, k, v, None, 0.3), expected, **TOL)


def test_batch_tells_the_model_when_every_caption_is_whole():
    from megatron_video.training.data import BatchEncoder
    from megatron_video.training.loop import t2v_inputs

    args = SimpleNamespace(vae_chunk_size=None, vae_path=None, t5_path=None, clip_path=None)
    encode = BatchEncoder(args, torch.device("cpu"))
    batch = {"latent": torch.zeros(2, 4, 1, 2, 2), "t5_hidden": torch.zeros(2, 3, 5), "clip_pooled": torch.zeros(2, 6),
             "sample_id": [0, 1]}
    sample = SimpleNamespace(x_t=torch.zeros(2, 4, 1, 2, 2), timestep=torch.zeros(2))
    whole = encode({**batch, "t5_mask": torch.ones(2, 3, dtype=torch.bool)})
    inputs = t2v_inputs(whole, sample)
    assert whole["t5_all_valid"] is True and inputs["encoder_attention_mask"] is None
    assert inputs["attention_mask"] is None and inputs["loss_mask"].all()
    padded = encode({**batch, "t5_mask": torch.tensor([[True, True, False], [True, True, True]])})
    assert padded["t5_all_valid"] is False
    assert torch.equal(t2v_inputs(padded, sample)["encoder_attention_mask"][:, 0], padded["t5_mask"])


def parallel_worker(variants) -> list[dict]:
    from megatron.core import parallel_state as mpu

    from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.parallel import initialize_parallel

    cfg = suv_config("small")
    out = []
    for tp, cp, sp in variants:
        initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        torch.manual_seed(0)
        model = SUVMMDiT(cfg, megatron_config(cfg, tensor_model_parallel_size=tp, context_parallel_size=cp,
                                              sequence_parallel=sp, params_dtype=torch.float32,
                                              use_cpu_initialization=True))
        calls = _spy(model)
        # 4 x 4 x 4 = 64 tokens: a multiple of U * S * P = 16 * 1 * 2 under CP2, of 2 under TP2 + SP; text 8
        inputs = _inputs(cfg, (4, 8, 8))
        masked = _run(model, inputs)
        masked_calls = list(calls)
        calls.clear()
        unmasked = _run(model, {**inputs, "attention_mask": None, "encoder_attention_mask": None})
        _compare(unmasked, masked)
        out.append({"variant": (tp, cp, sp), "masked": masked_calls, "unmasked": list(calls),
                    "rank": mpu.get_tensor_model_parallel_rank()})
    return out


@pytest.mark.slow
def test_unmasked_under_context_and_sequence_parallel():
    """CP2 (the skiparse layouts, Ulysses at k = 1) and TP2 + Megatron-SP: no mask anywhere, same output."""
    for records in run_distributed(parallel_worker, 2, [(1, 2, False), (2, 1, True)], timeout=300):
        for record in records:
            assert record["masked"] and not any(u for _, u in record["masked"]), record
            assert record["unmasked"] and all(u for _, u in record["unmasked"]), record
