"""The upstream SparseUMMDiT constructor arguments (Open-Sora Plan `mindspeed_mmdit` fork and MindSpeed-MM
`opensoraplan1.5`) <-> our `SUVConfig`.

Both upstream constructors take `**kwargs`, so a misspelt key is swallowed and its default used (16 heads x 88):
what we write must use their argument names exactly (tests/data/mindspeed/sparseu_mmdit_signature.json records
them). Reading accepts both spellings (the fork's `patch_size` / `patch_size_t`, MindSpeed-MM's `patch_size_thw`)
and the names of our older exports; every key that has no counterpart is returned with the reason, and a value
that would build a different network is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_video.models.suv_mmdit.config import SUVConfig

# Direct counterparts: upstream argument -> SUVConfig field.
DIRECT = {
    "num_layers": "num_layers", "sparse_n": "sparse_n", "num_heads": "num_heads", "head_dim": "head_dim",
    "in_channels": "in_channels", "out_channels": "out_channels", "timestep_embed_dim": "timestep_embed_dim",
    "caption_channels": "caption_channels", "pooled_projection_dim": "pooled_projection_dim",
    "norm_eps": "norm_eps", "skip_connection": "skip_connection", "patch_size": "patch_size",
    "patch_size_t": "patch_size_t",
}
# Our earlier config.json spellings (read, never written).
OLD_NAMES = {"num_attention_heads": "num_heads", "attention_head_dim": "head_dim"}
# Upstream arguments our model implements with one value only: key -> (accepted values, what it means).
FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "double_ff": ((True,), "the text stream has its own FFN in every block but the last"),
    "attention_bias": ((True,), "q/k/v projections carry biases"),
    "ff_bias": ((False,), "FFN linears without biases"),  # not an upstream argument; our earlier exports wrote it
    "activation_fn": (("gelu-approximate",), "FFN activation GELU (tanh approximation)"),
    "dropout": ((0.0, 0), "no dropout"),
    "skip_connection_zero_init": ((True,), "long-skip linears start as [I | 0], without a norm in front"),
    "norm_cls": (("layer_norm", "fp32_layer_norm"), "LayerNorm computed in fp32"),
    "explicit_uniform_rope": ((False,), "RoPE positions from the latent grid"),
    "interpolation_scale_t": ((1.0, 1), "RoPE without position interpolation"),
    "interpolation_scale_h": ((1.0, 1), "RoPE without position interpolation"),
    "interpolation_scale_w": ((1.0, 1), "RoPE without position interpolation"),
}
# Keys with no counterpart in the model config, and why.
NO_COUNTERPART = {
    "model_id": "always SparseUMMDiT; our model config says `model: suv_mmdit`",
    "norm_elementwise_affine": "upstream ignores it for these norms: every LayerNorm keeps its weight and bias",
    "dtype": "the parameter dtype comes from the launch flags (--bf16 / --fp16)",
    "from_pretrained": "weights are imported with `python -m checkpoints_convert import`, then --load/--finetune",
    "sample_size_t": "only sizes upstream's RoPE position cache; positions come from each batch's shape",
    "sample_size_h": "only sizes upstream's RoPE position cache; positions come from each batch's shape",
    "sample_size_w": "only sizes upstream's RoPE position cache; positions come from each batch's shape",
}
# Read together with other keys (below): key -> what it becomes.
COMBINED = {
    "sparse1d": "with sparse_n (false: sparse_n = 1 in every stage, as upstream)",
    "patch_size_thw": "patch_size_t (t) and patch_size (h = w)",
}
RELEASED_ROPE_BASE = 10000.0  # upstream's RoPE3D(freq=10000.0) has no constructor argument for it


class UpstreamConfigError(ValueError):
    """An upstream predictor config that our model cannot build as upstream would."""


def predictor_kwargs(cfg: SUVConfig) -> dict[str, Any]:
    """The upstream constructor's keyword arguments that build `cfg` (the fork's spelling, which the diffusers
    folder's config.json and the fork's model JSON use)."""
    if cfg.ffn_mult != 4:
        raise UpstreamConfigError("upstream has no FFN multiplier argument (always 4): cannot express "
                                  f"ffn_mult = {cfg.ffn_mult}")
    if cfg.rope_base != RELEASED_ROPE_BASE:
        raise UpstreamConfigError(f"upstream has no RoPE base argument (always {RELEASED_ROPE_BASE:g}): cannot "
                                  f"express rope_base = {cfg.rope_base:g}")
    if cfg.condition_channels:
        raise UpstreamConfigError("upstream SparseUMMDiT has no extra condition channels (an i2v model of ours)")
    out: dict[str, Any] = {}
    for key, field in DIRECT.items():
        value = getattr(cfg, field)
        out[key] = list(value) if isinstance(value, tuple) else value
    out.update(double_ff=True, sparse1d=True, attention_bias=True, activation_fn="gelu-approximate", dropout=0.0,
               norm_cls="layer_norm", norm_elementwise_affine=True, skip_connection_zero_init=True)
    return out


def config_from_predictor(data: dict[str, Any], base: SUVConfig | None = None,
                          ) -> tuple[SUVConfig, dict[str, str]]:
    """An `SUVConfig` from an upstream predictor section / config.json (fields it lacks come from `base`) and
    {key: reason} for every key that has no counterpart. Raises UpstreamConfigError for values that would build a
    different network."""
    values: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    for key, value in data.items():
        if key.startswith("_"):  # diffusers bookkeeping (_class_name, _diffusers_version)
            dropped[key] = "diffusers bookkeeping"
        elif key in DIRECT:
            values[DIRECT[key]] = value
        elif key in OLD_NAMES:
            values.setdefault(OLD_NAMES[key], value)
        elif key in FIXED:
            accepted, meaning = FIXED[key]
            if value not in accepted or isinstance(value, bool) != isinstance(accepted[0], bool):
                raise UpstreamConfigError(f"{key} = {value!r} is not supported: our model has {meaning} "
                                          f"({key} = {accepted[0]!r})")
        elif key == "rope_base":  # our earlier exports wrote it
            if float(value) != RELEASED_ROPE_BASE:
                values["rope_base"] = float(value)
        elif key in NO_COUNTERPART:
            dropped[key] = NO_COUNTERPART[key]
        elif key not in COMBINED:
            raise UpstreamConfigError(f"unknown predictor key {key!r}")
    if "patch_size_thw" in data:
        t, h, w = data["patch_size_thw"]
        if h != w:
            raise UpstreamConfigError(f"patch_size_thw {data['patch_size_thw']}: only square patches (h = w)")
        values.setdefault("patch_size_t", t)
        values.setdefault("patch_size", h)
    if data.get("out_channels", 0) is None:  # upstream: out_channels None means in_channels
        values["out_channels"] = values.get("in_channels", (base or SUVConfig()).in_channels)
    if data.get("sparse1d") is False:
        n = len(values.get("num_layers", (base or SUVConfig()).num_layers))
        values["sparse_n"] = (1,) * n
    try:
        return dataclasses.replace(base or SUVConfig(), **values), dropped
    except (TypeError, ValueError) as exc:
        raise UpstreamConfigError(str(exc)) from exc


__all__ = ["COMBINED", "DIRECT", "FIXED", "NO_COUNTERPART", "UpstreamConfigError", "config_from_predictor",
           "predictor_kwargs"]
