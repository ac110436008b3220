"""The inpainting input of the SUV model: extra channels start at zero, so the I2V model equals the T2V model
at step 0; a T2V dist checkpoint loads into the I2V model (at another TP size) with the new weights zeroed."""

from __future__ import annotations

import pytest
import torch

from megatron_video.inpaint import condition_channels
from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
from megatron_video.models.suv_mmdit.config import megatron_config
from tests.harness import run_distributed

T2V = suv_config("small", caption_channels=16, pooled_projection_dim=8)
I2V = T2V.replace(condition_channels=condition_channels(T2V.in_channels))


def inputs(cfg, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t, h, w, text = 2, 3, 4, 4, 5
    return {
        "hidden_states": torch.randn(b, cfg.in_channels + cfg.condition_channels, t, h, w, generator=g),
        "timestep": torch.tensor([250.0, 731.5]),
        "encoder_hidden_states": torch.randn(b, 1, text, cfg.caption_channels, generator=g),
        "pooled_projections": torch.randn(b, 1, cfg.pooled_projection_dim, generator=g),
        "attention_mask": torch.ones(b, t, h, w, dtype=torch.long),
        "encoder_attention_mask": torch.ones(b, 1, text, dtype=torch.long),
    }


def build(cfg, tp: int = 1) -> SUVMMDiT:
    return SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True,
                                         tensor_model_parallel_size=tp))




def test_i2v_equals_t2v_at_step_0_and_learns_the_condition(tp1) -> None:
    torch.manual_seed(0)
    t2v = build(T2V)
    i2v = build(I2V)
    result = i2v.load_state_dict(t2v.state_dict(), strict=False)  # released / T2V weights load unchanged
    assert result.missing_keys == ["patch_embed.cond_proj.weight"] and not result.unexpected_keys
    assert i2v.patch_embed.proj.weight.shape == t2v.patch_embed.proj.weight.shape
    assert not i2v.patch_embed.cond_proj.weight.any()
    x = inputs(I2V)
    out = i2v(**x)
    ref = t2v(**{**x, "hidden_states": x["hidden_states"][:, :T2V.in_channels]})
    assert out.shape == ref.shape == (2, T2V.out_channels, 3, 4, 4)
    assert torch.equal(out, ref)
    out.square().mean().backward()
    assert i2v.patch_embed.cond_proj.weight.grad.abs().sum() > 0  # the conditioning can be learnt
    with torch.no_grad():
        i2v.patch_embed.cond_proj.weight.normal_()
    assert not torch.allclose(i2v(**x), ref)  # ... and, once learnt, is used


def test_input_channel_check_names_the_expected_count(tp1) -> None:
    i2v = build(I2V)
    with pytest.raises(ValueError, match=f"\\(B, {T2V.in_channels + I2V.condition_channels}, T, H, W\\)"):
        i2v(**inputs(T2V))
    with pytest.raises(ValueError, match="condition_channels"):
        T2V.replace(condition_channels=-1)


def _t2v_checkpoint_into_i2v(root: str) -> float:
    from megatron_video.inpaint.init_t2v import load_t2v_checkpoint
    from megatron_video.parallel import initialize_parallel, set_seed
    from megatron_video.training.checkpointing import model_sharded_state_dict, save_checkpoint

    initialize_parallel(tensor_model_parallel_size=2)
    set_seed(3)
    t2v = build(T2V, tp=2)
    save_checkpoint(root, 5, {"model": model_sharded_state_dict(t2v)}, {"world_size": 2})
    set_seed(4)
    i2v = build(I2V, tp=2)
    with torch.no_grad():
        i2v.patch_embed.cond_proj.weight.normal_()
    assert load_t2v_checkpoint(i2v, root) == 5
    assert not i2v.patch_embed.cond_proj.weight.any()
    x = inputs(I2V)
    out = i2v(**x)
    ref = t2v(**{**x, "hidden_states": x["hidden_states"][:, :T2V.in_channels]})
    return float((out - ref).abs().max())


@pytest.mark.slow
def test_t2v_checkpoint_initialises_the_i2v_model(tmp_path) -> None:
    diffs = run_distributed(_t2v_checkpoint_into_i2v, 2, str(tmp_path / "t2v"))
    assert diffs == [0.0, 0.0]
