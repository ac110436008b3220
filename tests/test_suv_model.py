"""The SUV MMDiT at TP = 1: parameter count, name mapping, U-shape, dtypes, recompute, input checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
from megatron_video.models.suv_mmdit.config import megatron_config, skip_partner
from megatron_video.models.suv_mmdit.state_dict_adapter import (
    from_released,
    from_released_key,
    load_released,
    merge_released,
    shard_released,
    to_released,
    to_released_key,
    tp_split_rule,
)
from tests.test_suv_tp import _inputs, random_released_weights

TSV = Path(__file__).resolve().parent / "data" / "osp_v1_5_8.5b_state_dict.tsv"




def build(cfg, dtype=torch.float32, seed: int | None = 0, **megatron_flags) -> SUVMMDiT:
    model = SUVMMDiT(cfg, megatron_config(cfg, params_dtype=dtype, use_cpu_initialization=True, **megatron_flags))
    if seed is not None:
        weights = {k: v.to(dtype) for k, v in random_released_weights(model, seed).items()}
        load_released(model, weights, 1, 0)
    return model


def _meta_8p5b(with_text: bool):
    cfg = suv_config("osp-v1.5-8.5b", build_last_block_text_modules=with_text)
    with torch.device("meta"):
        model = SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.bfloat16, use_cpu_initialization=True,
                                              perform_initialization=False))
    return cfg, model


def test_8p5b_parameter_count(tp1) -> None:
    """Built on the meta device at TP = 1: the released count (and the merged file's with the last block's
    text modules)."""
    for with_text, expected in ((False, 8_504_661_120), (True, 8_589_604_992)):
        _, model = _meta_8p5b(with_text)
        assert sum(p.numel() for p in model.parameters()) == expected


def test_8p5b_names_map_onto_released_schema(tp1) -> None:
    """Our names map onto the released file's 1,633 entries with the same shapes and TP split rules."""
    rows = [line.split("\t") for line in TSV.read_text().splitlines()[1:]]
    released = {key: (shape, rule) for key, shape, rule, *_ in rows}
    assert len(released) == 1633
    rule_names = {"dim0 (column)": "column", "dim1 (row)": "row", "replicated": "replicated"}
    last_block_text = ("6.1.attn1.to_add_out.", "6.1.norm2.norm_enc.", "6.1.ff_enc.")
    for with_text in (False, True):
        cfg, model = _meta_8p5b(with_text)
        ours = to_released(model.state_dict(), cfg)
        wanted = {k for k in released if with_text or not any(s in k for s in last_block_text)}
        assert set(ours) == wanted
        for key, value in ours.items():
            shape, rule = released[key]
            assert (shape == "None") == (value is None), key
            if value is not None:
                assert "x".join(map(str, value.shape)) == shape, key
            assert tp_split_rule(key) == rule_names.get(rule, "extra_state"), key
            assert to_released_key(from_released_key(key, cfg), cfg) == key


def test_state_dict_mapping_and_tp_shards_round_trip(tp1) -> None:
    cfg = suv_config("small")
    model = build(cfg)
    ours = model.state_dict()
    released = to_released(ours, cfg)
    assert from_released(released, cfg).keys() == ours.keys()
    assert released["skip_norm_linear.0.1.weight"] is ours["blocks.6.long_skip.video.weight"]  # stage 3 <- 1
    assert released["skip_norm_linear_enc.1.1.bias"] is ours["blocks.8.long_skip.text.bias"]  # stage 4 <- 0
    assert released["transformer_blocks.2.1.attn1.to_out.0.bias"] is ours["blocks.5.attn.to_out.bias"]
    for tp in (2, 4):
        shards = [shard_released(released, tp, r) for r in range(tp)]
        assert shards[1]["transformer_blocks.0.0.norm1.linear.weight"].shape[0] * tp == 6 * cfg.hidden_size
        assert shards[1]["transformer_blocks.0.0.ff.net.2.weight"].shape[1] * tp == cfg.ffn_hidden_size
        merged = merge_released(shards)
        assert merged.keys() == released.keys()
        assert all(torch.equal(merged[k], v) for k, v in released.items() if v is not None)
    with pytest.raises(KeyError, match="no released name"):
        to_released_key("blocks.99.attn.to_q.weight", cfg)
    with pytest.raises(KeyError, match="no parameter of ours"):
        from_released_key("transformer_blocks.0.0.attn1.to_qkv.weight", cfg)
    bad = dict(shards[1])
    bad["proj_out.bias"] = bad["proj_out.bias"] + 1
    with pytest.raises(ValueError, match="differs between TP ranks"):
        merge_released([shards[0], bad, *shards[2:]])


def test_u_shape_block_specs() -> None:
    specs = suv_config("osp-v1.5-8.5b").block_specs()
    assert len(specs) == 32 and [s.stage for s in specs].count(3) == 8
    assert [s.mode for s in specs if s.stage == 1] == ["single", "group", "single", "group"]
    assert all(s.mode == "full" for s in specs if s.k == 1)
    assert [s.index for s in specs if s.skip_out] == [1, 5, 11]
    assert [(s.index, s.skip_in) for s in specs if s.skip_in is not None] == [(20, 0), (26, 1), (30, 2)]
    assert [skip_partner(s, 7) for s in range(7)] == [None, None, None, None, 2, 1, 0]
    assert [s.context_pre_only for s in specs].index(True) == 31


def test_skip_linears_at_init_equal_no_skips(tp1) -> None:
    """Long-skip linears at their [I | 0] initialisation make the U-shape a plain stack of the same blocks."""
    cfg = suv_config("small")
    with_skips = build(cfg)
    for block in with_skips.blocks:
        if block.long_skip is not None:
            block.long_skip.reset_parameters()
    no_skips = build(cfg.replace(skip_connection=False), seed=None)
    state = {k: v for k, v in with_skips.state_dict().items() if ".long_skip." not in k}
    no_skips.load_state_dict(state, strict=True)
    inputs = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(with_skips(**inputs), no_skips(**inputs), rtol=0, atol=1e-6)
        trained = build(cfg)  # random (trained-like) skip weights do change the output
        assert (trained(**inputs) - no_skips(**inputs)).abs().max() > 1e-2


def test_k1_everywhere_is_dense_joint_attention(tp1) -> None:
    """With sparsity 1 in every stage each block runs one dense attention over all [video ; text] tokens."""
    cfg = suv_config("small", sparse_n=(1, 1, 1, 1, 1))
    model = build(cfg)
    calls = []
    for block in model.blocks:
        inner = block.attn.attn_fn

        def recording(q, k, v, key_valid, *, scale, inner=inner):
            calls.append((q.shape[:2], k.shape[:2]))
            return inner(q, k, v, key_valid, scale=scale)

        block.attn.attn_fn = recording
    inputs = _inputs(cfg)
    n, text_len, batch = 3 * 3 * 2, 7, 2
    with torch.no_grad():
        model(**inputs)
    assert all(spec.mode == "full" for spec in cfg.block_specs())
    dense = ((n + text_len, batch), (n + text_len, batch))
    assert calls[:-1] == [dense] * (cfg.num_blocks - 1)
    assert calls[-1] == ((n, batch), (n + text_len, batch))  # last block: video queries only


def test_video_and_image_forward_backward_bf16(tp1) -> None:
    """bf16 parameters and stream: forward + backward at a video shape and an image shape (T = 1)."""
    cfg = suv_config("small")
    model = build(cfg, dtype=torch.bfloat16)
    reference = build(cfg, dtype=torch.float32)
    for t in (3, 1):
        inputs = _inputs(cfg)
        inputs["hidden_states"] = inputs["hidden_states"][:, :, :t]
        inputs["attention_mask"] = inputs["attention_mask"][:, :t]
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        assert out.dtype == torch.bfloat16 and out.shape == inputs["hidden_states"].shape
        out.float().square().mean().backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
        assert all(p.grad.dtype == torch.bfloat16 for _, p in trainable)
        with torch.no_grad():
            ref = reference(**inputs)
        assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_mixed_precision_boundaries(tp1) -> None:
    """fp32 conditioning and modulation, bf16 stream out of the fp32 norms."""
    model = build(suv_config("small"), dtype=torch.bfloat16)
    temb = model.time_text_embed(torch.tensor([10.0, 500.0]), torch.randn(2, 20))
    assert temb.dtype == torch.float32
    block = model.blocks[0]
    assert block.norm1(temb).dtype == torch.float32
    x = torch.randn(5, 2, model.cfg.hidden_size, dtype=torch.bfloat16)
    assert block.norm1_video(x).dtype == torch.bfloat16
    q = torch.randn(5, 2, 4, 16, dtype=torch.bfloat16)
    assert block.attn.norm_q(q).dtype == torch.bfloat16


def _count_calls(model: SUVMMDiT) -> dict[str, int]:
    """Forward calls of each block's attention module, its core attention (the layout + kernel) and FFN."""
    counts = {"attn": 0, "core": 0, "ff": 0}

    def hook(name):
        def fn(*_):
            counts[name] += 1
        return fn

    def counted(layout_fn):
        def fn(*args, **kwargs):
            counts["core"] += 1
            return layout_fn(*args, **kwargs)
        return fn

    for block in model.blocks:
        block.attn.register_forward_hook(hook("attn"))
        block.attn.layout_fn = counted(block.attn.layout_fn)
        block.ff.register_forward_hook(hook("ff"))
    return counts


@pytest.mark.parametrize(
    ("flags", "attn_factor", "core_factor", "ff_factor"),
    [
        ({}, 1, 1, 1),
        # Megatron's selective default: core attention only (TransformerConfig.recompute_modules = ["core_attn"])
        ({"recompute_granularity": "selective"}, 1, 2, 1),
        ({"recompute_granularity": "selective", "recompute_modules": ["mlp"]}, 1, 1, 2),
        ({"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]}, 1, 2, 2),
        ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}, 2, 2, 2),
    ],
)
def test_recompute_flags_take_effect(tp1, flags, attn_factor, core_factor, ff_factor) -> None:
    """Forwards counted over one step: recomputed modules run twice; gradients are unchanged."""
    cfg = suv_config("small")
    plain, model = build(cfg), build(cfg, **flags)
    counts = _count_calls(model)
    inputs = _inputs(cfg)
    model(**inputs).square().mean().backward()
    plain(**inputs).square().mean().backward()
    blocks = cfg.num_blocks
    assert counts == {"attn": attn_factor * blocks, "core": core_factor * blocks, "ff": ff_factor * blocks}
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        if p.requires_grad:
            err, scale = (p.grad - q.grad).abs().max().item(), q.grad.abs().max().item()
            assert err <= 1e-5 * scale, f"{name}: {err} vs {scale}"


def test_full_recompute_block_method_counts_first_layers(tp1) -> None:
    cfg = suv_config("small")
    model = build(cfg, recompute_granularity="full", recompute_method="block", recompute_num_layers=3)
    counts = _count_calls(model)
    model(**_inputs(cfg)).sum().backward()
    assert counts == {"attn": cfg.num_blocks + 3, "core": cfg.num_blocks + 3, "ff": cfg.num_blocks + 3}


def test_bad_inputs_fail_early(tp1) -> None:
    cfg = suv_config("small")
    model = build(cfg, seed=None)
    good = _inputs(cfg)
    cases = {
        "hidden_states": (good["hidden_states"][:, :3], "hidden_states must be"),
        "attention_mask": (good["attention_mask"][:, :, :4], "attention_mask must be"),
        "timestep": (good["timestep"][:1], "timestep must be"),
        "encoder_attention_mask": (torch.zeros_like(good["encoder_attention_mask"]), "at least one valid text"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            model(**{**good, name: value})
    odd = {**good, "hidden_states": good["hidden_states"][..., :3], "attention_mask": good["attention_mask"][..., :3]}
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(**odd)


def test_config_must_match_the_parallel_state(tp1) -> None:
    cfg = suv_config("small")
    with pytest.raises(ValueError, match="tensor_model_parallel_size=2"):
        build(cfg, seed=None, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="odd number of stages"):
        suv_config("small", num_layers=(1, 1), sparse_n=(1, 1))
    with pytest.raises(ValueError, match="multiple of 16"):
        suv_config("small", head_dim=24)
    with pytest.raises(ValueError, match="unknown SUV preset"):
        suv_config("huge")
