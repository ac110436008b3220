"""Mapping between our parameter names and the released Open-Sora Plan v1.5 names, and the TP split rules.

Released layout (tests/data/osp_v1_5_8.5b_state_dict.tsv): diffusers-style names under
`transformer_blocks.{stage}.{i}.`, long skips as `skip_norm_linear(_enc).{j}.1`, final layer at top level. Ours:
a flat `blocks.{global index}` list (pipeline-friendly), the long skip owned by the first block of its decoder
stage, the final layer under `final.`. The mapping is total in both directions for a given `SUVConfig`.

TP split rules (both references): column-parallel tensors split on dim 0 (q/k/v of both streams, FFN in, all
modulation linears, weight and bias); row-parallel weights split on dim 1 (both output projections, FFN out;
their biases are replicated); everything else replicated. Shards are contiguous and concatenated in rank order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from megatron_video.models.suv_mmdit.config import SUVConfig

SplitRule = Literal["column", "row", "replicated", "extra_state"]

_TOP_LEVEL = (  # (ours, released) module prefixes outside the blocks
    ("patch_embed.proj", "patch_embed.proj"),
    ("patch_embed.cond_proj", "patch_embed.cond_proj"),  # inpainting models only (not in the released T2V)
    ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_1"),
    ("time_text_embed.timestep_embedder.linear_2", "time_text_embed.timestep_embedder.linear_2"),
    ("time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_1"),
    ("time_text_embed.text_embedder.linear_2", "time_text_embed.text_embedder.linear_2"),
    ("caption_projection", "caption_projection"),
    ("final.norm_final", "norm_final"),
    ("final.norm_out.linear", "norm_out.linear"),
    ("final.norm", "norm_out.norm"),
    ("final.proj_out", "proj_out"),
)

_BLOCK = (  # (ours, released) module prefixes inside block `blocks.{g}` / `transformer_blocks.{s}.{i}`
    ("norm1.linear", "norm1.linear"),
    ("norm1_video", "norm1.norm"),
    ("norm1_text", "norm1.norm_enc"),
    ("attn.to_q", "attn1.to_q"),
    ("attn.to_k", "attn1.to_k"),
    ("attn.to_v", "attn1.to_v"),
    ("attn.add_q", "attn1.add_q_proj"),
    ("attn.add_k", "attn1.add_k_proj"),
    ("attn.add_v", "attn1.add_v_proj"),
    ("attn.to_out", "attn1.to_out.0"),
    ("attn.to_add_out", "attn1.to_add_out"),
    ("attn.norm_q", "attn1.norm_q"),
    ("attn.norm_k", "attn1.norm_k"),
    ("attn.norm_added_q", "attn1.norm_added_q"),
    ("attn.norm_added_k", "attn1.norm_added_k"),
    ("norm2.linear", "norm2.linear"),
    ("norm2_video", "norm2.norm"),
    ("norm2_text", "norm2.norm_enc"),
    ("ff.fc1", "ff.net.0.proj"),
    ("ff.fc2", "ff.net.2"),
    ("ff_text.fc1", "ff_enc.net.0.proj"),
    ("ff_text.fc2", "ff_enc.net.2"),
)

_SKIP = (("long_skip.video", "skip_norm_linear.{j}.1"), ("long_skip.text", "skip_norm_linear_enc.{j}.1"))

_COLUMN = re.compile(
    r"(^|\.)(norm1\.linear|norm2\.linear|norm_out\.linear|attn1\.(to_[qkv]|add_[qkv]_proj)|ff(_enc)?\.net\.0\.proj)"
    r"\.(weight|bias)$"
)
_ROW = re.compile(r"(^|\.)(attn1\.to_out\.0|attn1\.to_add_out|ff(_enc)?\.net\.2)\.weight$")
_LEAF = re.compile(r"^(?P<module>.+)\.(?P<leaf>weight|bias|_extra_state)$")


def _split_leaf(key: str) -> tuple[str, str]:
    match = _LEAF.match(key)
    if match is None:
        raise KeyError(f"not a parameter key (expected ...weight/bias/_extra_state): {key!r}")
    return match["module"], match["leaf"]


def block_key_to_released(key: str) -> str:
    """A key inside one block (e.g. `attn.to_q.weight`) -> its released name inside the block (`attn1.to_q.weight`)."""
    module, leaf = _split_leaf(key)
    for ours, released in _BLOCK:
        if module == ours:
            return f"{released}.{leaf}"
    raise KeyError(f"no released name for the block key {key!r}")


def block_key_from_released(key: str) -> str:
    """The inverse of `block_key_to_released`."""
    module, leaf = _split_leaf(key)
    for ours, released in _BLOCK:
        if module == released:
            return f"{ours}.{leaf}"
    raise KeyError(f"no block key of ours for the released {key!r}")


def to_released_key(key: str, cfg: SUVConfig) -> str:
    """Our parameter name -> the released name."""
    module, leaf = _split_leaf(key)
    for ours, released in _TOP_LEVEL:
        if module == ours:
            return f"{released}.{leaf}"
    match = re.match(r"^blocks\.(\d+)\.(.+)$", module)
    if match is not None:
        specs = cfg.block_specs()
        g, rest = int(match[1]), match[2]
        if g < len(specs):
            spec = specs[g]
            for ours, released in _BLOCK:
                if rest == ours:
                    return f"transformer_blocks.{spec.stage}.{spec.index_in_stage}.{released}.{leaf}"
            for ours, released in _SKIP:
                if rest == ours and spec.skip_in is not None:
                    return f"{released.format(j=spec.skip_in)}.{leaf}"
    raise KeyError(f"no released name for {key!r} under this SUVConfig")


def from_released_key(key: str, cfg: SUVConfig) -> str:
    """Released parameter name -> our name."""
    module, leaf = _split_leaf(key)
    for ours, released in _TOP_LEVEL:
        if module == released:
            return f"{ours}.{leaf}"
    specs = cfg.block_specs()
    match = re.match(r"^transformer_blocks\.(\d+)\.(\d+)\.(.+)$", module)
    if match is not None:
        stage, i, rest = int(match[1]), int(match[2]), match[3]
        for spec in specs:
            if (spec.stage, spec.index_in_stage) == (stage, i):
                for ours, released in _BLOCK:
                    if rest == released:
                        return f"blocks.{spec.index}.{ours}.{leaf}"
    match = re.match(r"^(skip_norm_linear(?:_enc)?)\.(\d+)\.1$", module)
    if match is not None:
        j = int(match[2])
        for spec in specs:
            if spec.skip_in == j:
                ours = "long_skip.text" if match[1].endswith("_enc") else "long_skip.video"
                return f"blocks.{spec.index}.{ours}.{leaf}"
    raise KeyError(f"no parameter of ours for released key {key!r} under this SUVConfig")


def to_released(state_dict: Mapping[str, Any], cfg: SUVConfig) -> dict[str, Any]:
    """Rename our state dict (full or one TP rank's shard) to released names; values unchanged."""
    return {to_released_key(k, cfg): v for k, v in state_dict.items()}


def from_released(state_dict: Mapping[str, Any], cfg: SUVConfig) -> dict[str, Any]:
    """Rename a released-format state dict (full or one TP rank's shard) to our names; values unchanged."""
    return {from_released_key(k, cfg): v for k, v in state_dict.items()}


def tp_split_rule(released_key: str) -> SplitRule:
    """How a released tensor is split over tensor-parallel ranks."""
    if released_key.endswith("._extra_state"):
        return "extra_state"
    if _COLUMN.search(released_key):
        return "column"
    if _ROW.search(released_key):
        return "row"
    return "replicated"


def _split_dim(rule: SplitRule) -> int | None:
    return {"column": 0, "row": 1}.get(rule)


def shard_released(state_dict: Mapping[str, Any], tp_size: int, tp_rank: int) -> dict[str, Any]:
    """One TP rank's part of a full released-format state dict (contiguous chunks, rank order)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        dim = _split_dim(tp_split_rule(key))
        if dim is None or not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        if value.shape[dim] % tp_size != 0:
            raise ValueError(f"{key}: dim {dim} of size {value.shape[dim]} is not divisible by TP size {tp_size}")
        out[key] = value.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def merge_released(shards: Sequence[Mapping[str, Any]], check_replicated: bool = True) -> dict[str, Any]:
    """Inverse of `shard_released`: concatenate split tensors in rank order; replicated ones come from rank 0
    (and must be equal on every rank if `check_replicated`), extra states from rank 0."""
    if not shards:
        raise ValueError("no shards to merge")
    keys = set(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != keys:
            raise ValueError(f"TP rank {rank} holds different keys than rank 0: {sorted(set(shard) ^ keys)[:5]}")
    out: dict[str, Any] = {}
    for key in shards[0]:
        values = [shard[key] for shard in shards]
        dim = _split_dim(tp_split_rule(key))
        if dim is not None and isinstance(values[0], torch.Tensor):
            out[key] = torch.cat(values, dim=dim)
            continue
        tensors = isinstance(values[0], torch.Tensor)
        if check_replicated and tensors and not all(torch.equal(values[0], v) for v in values[1:]):
            raise ValueError(f"replicated tensor {key} differs between TP ranks")
        out[key] = values[0]
    return out


def load_released(model: torch.nn.Module, state_dict: Mapping[str, Any], tp_size: int, tp_rank: int) -> None:
    """Load a full released-format state dict into this TP rank's model (strict: every key must match)."""
    cfg = model.cfg
    ours = from_released(shard_released(state_dict, tp_size, tp_rank), cfg)
    model.load_state_dict(ours, strict=True)


__all__ = [
    "SplitRule", "block_key_from_released", "block_key_to_released", "from_released", "from_released_key",
    "load_released", "merge_released", "shard_released", "to_released", "to_released_key", "tp_split_rule",
]
