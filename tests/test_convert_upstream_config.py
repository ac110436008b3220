"""The diffusers folder's config.json speaks the upstream constructor's language: its keys are SparseUMMDiT's
argument names (recorded in tests/data/mindspeed/sparseu_mmdit_signature.json, with where they were read), so the
upstream model built from it is ours, not its 16 x 88 defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checkpoints_convert.schema import SchemaError, config_from_diffusers, diffusers_config
from megatron_video.models.suv_mmdit.config import PRESETS
from megatron_video.models.suv_mmdit.upstream import UpstreamConfigError, config_from_predictor, predictor_kwargs

SIGNATURE = json.loads((Path(__file__).parent / "data/mindspeed/sparseu_mmdit_signature.json").read_text())
FORK_ARGS = SIGNATURE["open_sora_plan_fork"]["args"]
MSMM_ARGS = SIGNATURE["mindspeed_mm"]["args"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_json_keys_are_the_fork_constructor_arguments(preset: str) -> None:
    cfg = PRESETS[preset]
    written = diffusers_config(cfg)
    keys = {k for k in written if not k.startswith("_")}
    assert keys <= set(FORK_ARGS), sorted(keys - set(FORK_ARGS))
    # What the upstream constructor binds: its defaults, overridden by the file (**kwargs swallows the rest).
    bound = {**FORK_ARGS, **{k: v for k, v in written.items() if k in FORK_ARGS}}
    assert (bound["num_heads"], bound["head_dim"]) == (cfg.num_heads, cfg.head_dim)
    assert bound["sparse1d"] is True and bound["double_ff"] is True
    assert config_from_predictor(bound)[0] == cfg


def test_mindspeed_mm_predictor_spelling_reads_the_same() -> None:
    cfg = PRESETS["osp-v1.5-8.5b"]
    msmm = {k: v for k, v in predictor_kwargs(cfg).items() if k in MSMM_ARGS}
    msmm.update(patch_size_thw=[cfg.patch_size_t, cfg.patch_size, cfg.patch_size], norm_cls="fp32_layer_norm")
    assert set(msmm) <= set(MSMM_ARGS)
    assert config_from_predictor({**MSMM_ARGS, **msmm})[0] == cfg


def test_old_export_names_still_read() -> None:
    cfg = PRESETS["tiny"]
    old = {"_class_name": "SparseUMMDiT", "num_layers": [2, 2, 2], "sparse_n": [1, 2, 1], "num_attention_heads": 2,
           "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "patch_size": 2, "patch_size_t": 1,
           "timestep_embed_dim": 16, "caption_channels": 24, "pooled_projection_dim": 20, "norm_eps": 1e-6,
           "skip_connection": True, "sparse1d": True, "double_ff": True, "rope_base": 10000.0, "attention_bias": True,
           "activation_fn": "gelu-approximate", "norm_elementwise_affine": True, "ff_bias": False,
           "skip_connection_zero_init": True}  # everything our earlier exports wrote
    assert config_from_diffusers(old) == cfg


def test_values_upstream_cannot_express_or_we_cannot_build_are_errors() -> None:
    with pytest.raises(SchemaError, match="RoPE base"):
        diffusers_config(PRESETS["tiny"].replace(rope_base=500.0))
    with pytest.raises(SchemaError, match="FFN multiplier"):
        diffusers_config(PRESETS["tiny"].replace(ffn_mult=2))
    with pytest.raises(SchemaError, match="norm_cls"):
        config_from_diffusers({**diffusers_config(PRESETS["tiny"]), "norm_cls": "rms_norm"})
    with pytest.raises(UpstreamConfigError, match="double_ff"):
        config_from_predictor({"double_ff": False})
    with pytest.raises(UpstreamConfigError, match="unknown predictor key"):
        config_from_predictor({"num_head": 24})
    cfg, dropped = config_from_predictor({"sparse1d": False, "num_layers": [2, 2, 2], "sparse_n": [1, 4, 1],
                                          "dtype": "bf16"})
    assert cfg.sparse_n == (1, 1, 1) and set(dropped) == {"dtype"}  # sparse1d is read with sparse_n
