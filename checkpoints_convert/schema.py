"""The released Open-Sora Plan v1.5 state-dict schema for any `SUVConfig`, and its diffusers `config.json`.

`released_schema(cfg, last_block_text=True)` lists every entry of the released merged file in file order
(tests/data/osp_v1_5_8.5b_state_dict.tsv for the 8.5B preset): tensor shapes, and None for the
`._extra_state` entries of the Megatron parallel linears. `last_block_text=False` drops the last block's text
output path (to_add_out, norm2.norm_enc, ff_enc), which a TP = 1 build of ours does not have.
"""

from __future__ import annotations

from typing import Any

from megatron_video.models.suv_mmdit.config import SUVConfig
from megatron_video.models.suv_mmdit.upstream import UpstreamConfigError, config_from_predictor, predictor_kwargs

Shape = tuple[int, ...]

# Released suffixes of the last block's text output path (present in the released TP = 8 file only).
LAST_BLOCK_TEXT_SUFFIXES = (
    "attn1.to_add_out.weight", "attn1.to_add_out.bias", "attn1.to_add_out._extra_state",
    "norm2.norm_enc.weight", "norm2.norm_enc.bias",
    "ff_enc.net.0.proj.weight", "ff_enc.net.0.proj._extra_state",
    "ff_enc.net.2.weight", "ff_enc.net.2._extra_state",
)


class SchemaError(ValueError):
    """Weights that do not match the released schema of the given config."""


def _linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> list[tuple[str, Shape | None]]:
    entries: list[tuple[str, Shape | None]] = [(f"{prefix}.weight", (out_f, in_f))]
    if bias:
        entries.append((f"{prefix}.bias", (out_f,)))
    return entries


def _parallel_linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> list[tuple[str, Shape | None]]:
    return _linear(prefix, out_f, in_f, bias) + [(f"{prefix}._extra_state", None)]


def _norm(prefix: str, dim: int, bias: bool = True) -> list[tuple[str, Shape | None]]:
    return [(f"{prefix}.weight", (dim,))] + ([(f"{prefix}.bias", (dim,))] if bias else [])


def _block(cfg: SUVConfig, text_out: bool) -> list[tuple[str, Shape | None]]:
    h, t, f, d = cfg.hidden_size, cfg.timestep_embed_dim, cfg.ffn_hidden_size, cfg.head_dim
    e = _parallel_linear("norm1.linear", 6 * h, t) + _norm("norm1.norm", h) + _norm("norm1.norm_enc", h)
    e += _norm("attn1.norm_q", d, bias=False) + _norm("attn1.norm_k", d, bias=False)
    for name in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0"):
        e += _parallel_linear(f"attn1.{name}", h, h)
    if text_out:
        e += _parallel_linear("attn1.to_add_out", h, h)
    e += _norm("attn1.norm_added_q", d, bias=False) + _norm("attn1.norm_added_k", d, bias=False)
    e += _parallel_linear("norm2.linear", 6 * h, t) + _norm("norm2.norm", h)
    if text_out:
        e += _norm("norm2.norm_enc", h)
    e += _parallel_linear("ff.net.0.proj", f, h, bias=False) + _parallel_linear("ff.net.2", h, f, bias=False)
    if text_out:
        e += _parallel_linear("ff_enc.net.0.proj", f, h, bias=False)
        e += _parallel_linear("ff_enc.net.2", h, f, bias=False)
    return e


def released_schema(cfg: SUVConfig, last_block_text: bool = True) -> dict[str, Shape | None]:
    """Every released entry in file order: key -> shape, or None for an `._extra_state` entry."""
    h, t, p = cfg.hidden_size, cfg.timestep_embed_dim, cfg.patch_size
    e: list[tuple[str, Shape | None]] = [
        ("patch_embed.proj.weight", (h, cfg.in_channels, p, p)), ("patch_embed.proj.bias", (h,))]
    e += _linear("time_text_embed.timestep_embedder.linear_1", t, t)
    e += _linear("time_text_embed.timestep_embedder.linear_2", t, t)
    e += _linear("time_text_embed.text_embedder.linear_1", t, cfg.pooled_projection_dim)
    e += _linear("time_text_embed.text_embedder.linear_2", t, t)
    e += _linear("caption_projection", h, cfg.caption_channels)
    specs = cfg.block_specs()
    for spec in specs:
        prefix = f"transformer_blocks.{spec.stage}.{spec.index_in_stage}."
        text_out = not spec.context_pre_only or last_block_text
        e += [(prefix + key, shape) for key, shape in _block(cfg, text_out)]
    skips = sorted(spec.skip_in for spec in specs if spec.skip_in is not None)
    for name in ("skip_norm_linear", "skip_norm_linear_enc"):
        for j in skips:
            e += _linear(f"{name}.{j}.1", h, 2 * h)
    e += _norm("norm_final", h) + _parallel_linear("norm_out.linear", 2 * h, t) + _norm("norm_out.norm", h)
    e += _linear("proj_out", cfg.patch_out_features, h)
    return dict(e)


def last_block_text_keys(cfg: SUVConfig) -> list[str]:
    """The released keys of the last block's text output path."""
    last = cfg.block_specs()[-1]
    return [f"transformer_blocks.{last.stage}.{last.index_in_stage}.{s}" for s in LAST_BLOCK_TEXT_SUFFIXES]


def check_schema(shapes: dict[str, Shape | None], cfg: SUVConfig, what: str) -> bool:
    """Check released key -> shape (None: extra state, optional) against the schema of `cfg`; return whether
    the last block's text modules are present. Raises SchemaError naming unknown, missing and mismatched keys."""
    full = released_schema(cfg, last_block_text=True)
    text_keys = {k for k in last_block_text_keys(cfg) if full[k] is not None}
    has_text = any(k in shapes for k in text_keys)
    expected = {k: v for k, v in full.items() if v is not None and (has_text or k not in text_keys)}
    tensors = {k: v for k, v in shapes.items() if not k.endswith("._extra_state")}
    unknown = sorted(set(tensors) - set(expected)) + sorted(k for k in shapes if k not in full)
    missing = sorted(set(expected) - set(tensors))
    mismatched = [f"{k}: {tuple(tensors[k])} != expected {expected[k]}" for k in sorted(set(tensors) & set(expected))
                  if tuple(tensors[k]) != expected[k]]
    problems = []
    if unknown:
        problems.append(f"{len(set(unknown))} unknown key(s), e.g. {sorted(set(unknown))[:4]}")
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:4]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:3]}")
    if problems:
        raise SchemaError(f"{what} does not match the model config ({describe(cfg)}): " + "; ".join(problems))
    return has_text


def describe(cfg: SUVConfig) -> str:
    return (f"num_layers={list(cfg.num_layers)}, heads={cfg.num_heads}x{cfg.head_dim}, "
            f"in/out channels={cfg.in_channels}/{cfg.out_channels}")


# --- diffusers-style config.json ---------------------------------------------------------------------------

def diffusers_config(cfg: SUVConfig) -> dict[str, Any]:
    """The `config.json` of a diffusers-style folder holding these weights: upstream SparseUMMDiT's constructor
    arguments by their own names (megatron_video/models/suv_mmdit/upstream.py)."""
    try:
        return {"_class_name": "SparseUMMDiT", **predictor_kwargs(cfg)}
    except UpstreamConfigError as exc:
        raise SchemaError(f"cannot write an upstream config.json: {exc}") from exc


def config_from_diffusers(data: dict[str, Any], base: SUVConfig | None = None) -> SUVConfig:
    """A `SUVConfig` from a diffusers-style `config.json` or an upstream predictor section (fields it lacks come
    from `base`)."""
    try:
        return config_from_predictor(data, base)[0]
    except UpstreamConfigError as exc:
        raise SchemaError(f"config.json: {exc}") from exc


__all__ = ["LAST_BLOCK_TEXT_SUFFIXES", "SchemaError", "Shape", "check_schema", "config_from_diffusers",
           "describe", "diffusers_config", "last_block_text_keys", "released_schema"]
