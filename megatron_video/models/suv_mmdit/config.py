"""Configuration of the SUV (sparse U-shaped) MMDiT denoiser of Open-Sora Plan v1.5.

The model is built from a `SUVConfig` (architecture) plus a megatron-core `ModelParallelConfig` /
`TransformerConfig` (parallelism, dtype, recompute flags). Nothing is read from global arguments.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

AttentionMode = Literal["full", "single", "group"]

_log = logging.getLogger(__name__)
_ODD_STAGES_WARNED: set[tuple[int, ...]] = set()  # num_layers already warned about (once per shape)


@dataclass(frozen=True)
class BlockSpec:
    """Where one block sits in the U-shape; the block stack is a flat list of these (pipeline-friendly)."""

    index: int  # global block index 0..num_blocks-1
    stage: int  # U-net stage
    index_in_stage: int
    k: int  # skiparse sparsity of the stage (1 = full attention)
    mode: AttentionMode  # full (k=1), single skip (even block in stage), group skip (odd block)
    context_pre_only: bool  # last block: the text stream ends after attention
    skip_in: int | None  # first block of a decoder stage: index of its long-skip linear, else None
    skip_out: bool  # last block of an encoder stage: its output is pushed for a later decoder stage


def skip_partner(stage: int, num_stages: int) -> int | None:
    """Encoder stage whose output decoder `stage` consumes (LIFO pairing: mid+1 <-> mid-1, ..., last <-> 0)."""
    mid = num_stages // 2
    return num_stages - 1 - stage if stage > mid else None


@dataclass(frozen=True)
class SUVConfig:
    num_layers: tuple[int, ...] = (2, 4, 6, 8, 6, 4, 2)  # blocks per stage
    sparse_n: tuple[int, ...] = (1, 2, 4, 8, 4, 2, 1)  # skiparse k per stage
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 32
    out_channels: int = 32
    # Extra input channels after the latent (inpainting: masked-video latents + folded mask); only the patch
    # embedding reads them, through weights of their own that start at zero. 0 = text-to-video.
    condition_channels: int = 0
    patch_size: int = 2
    patch_size_t: int = 1
    timestep_embed_dim: int = 1024
    caption_channels: int = 2048
    pooled_projection_dim: int = 1280
    ffn_mult: int = 4
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    skip_connection: bool = True
    # The released TP=8 file keeps the last block's text output path (to_add_out, norm2.norm_enc, ff_enc);
    # it never affects the output. Build it only to hold those weights.
    build_last_block_text_modules: bool = False
    init_std: float = 0.02
    attention_backend: str | None = None  # None: chosen per device (see models/attention.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_layers", tuple(int(n) for n in self.num_layers))
        object.__setattr__(self, "sparse_n", tuple(int(k) for k in self.sparse_n))
        if len(self.num_layers) != len(self.sparse_n):
            raise ValueError(f"num_layers {self.num_layers} and sparse_n {self.sparse_n} differ in length")
        if len(self.num_layers) % 2 != 1:
            raise ValueError(f"the U-shape needs an odd number of stages, got {len(self.num_layers)}")
        if any(n < 1 for n in self.num_layers) or any(k < 1 for k in self.sparse_n):
            raise ValueError("every stage needs >= 1 block and sparsity k >= 1")
        if self.head_dim % 16 != 0:
            raise ValueError(f"head_dim must be a multiple of 16 (RoPE t:h:w = 4:6:6 sixteenths), got {self.head_dim}")
        if self.patch_size_t != 1:
            raise ValueError("only per-frame patches (patch_size_t = 1) are supported, as released")
        if self.condition_channels < 0:
            raise ValueError(f"condition_channels must be >= 0, got {self.condition_channels}")
        if self.timestep_embed_dim % 2 != 0:
            raise ValueError("timestep_embed_dim must be even ([cos | sin] halves)")
        odd = [i for i, n in enumerate(self.num_layers) if n % 2]
        if odd and self.num_layers not in _ODD_STAGES_WARNED:
            # Upstream (SparseUMMDiT) refuses this. The math is defined for it: blocks alternate single / group
            # skiparse by their index in the stage, so an odd sparse stage just ends on a single-skip block.
            _ODD_STAGES_WARNED.add(self.num_layers)
            _log.warning("num_layers %s has an odd number of blocks in stage(s) %s: accepted here, but Open-Sora "
                         "Plan / MindSpeed-MM refuse it, so such weights cannot be used there", list(self.num_layers),
                         odd)

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def ffn_hidden_size(self) -> int:
        return self.ffn_mult * self.hidden_size

    @property
    def num_stages(self) -> int:
        return len(self.num_layers)

    @property
    def num_blocks(self) -> int:
        return sum(self.num_layers)

    @property
    def patch_out_features(self) -> int:
        return self.patch_size_t * self.patch_size * self.patch_size * self.out_channels

    def block_specs(self) -> list[BlockSpec]:
        specs: list[BlockSpec] = []
        mid = self.num_stages // 2
        for stage, (n, k) in enumerate(zip(self.num_layers, self.sparse_n)):
            for i in range(n):
                mode: AttentionMode = "full" if k == 1 else ("single" if i % 2 == 0 else "group")
                skip_in = None
                if self.skip_connection and i == 0 and skip_partner(stage, self.num_stages) is not None:
                    skip_in = stage - mid - 1
                specs.append(BlockSpec(
                    index=len(specs), stage=stage, index_in_stage=i, k=k, mode=mode,
                    context_pre_only=False, skip_in=skip_in,
                    skip_out=self.skip_connection and stage < mid and i == n - 1,
                ))
        specs[-1] = dataclasses.replace(specs[-1], context_pre_only=True)
        return specs

    def replace(self, **changes: object) -> SUVConfig:
        return dataclasses.replace(self, **changes)


def megatron_config(cfg: SUVConfig, **overrides: object):
    """A megatron-core TransformerConfig describing this model (sizes from `cfg`) with parallelism, dtype and
    recompute flags from `overrides` (e.g. tensor_model_parallel_size=2, sequence_parallel=True,
    params_dtype=torch.bfloat16, bf16=True, recompute_granularity="full", recompute_method="uniform",
    recompute_num_layers=1). The model reads `sequence_parallel`, `params_dtype` and the recompute flags."""
    from megatron.core.transformer import TransformerConfig

    values: dict[str, object] = dict(
        num_layers=cfg.num_blocks, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        kv_channels=cfg.head_dim, ffn_hidden_size=cfg.ffn_hidden_size, layernorm_epsilon=cfg.norm_eps,
        add_bias_linear=True, gated_linear_unit=False, hidden_dropout=0.0, attention_dropout=0.0,
    )
    values.update(overrides)
    return TransformerConfig(**values)


PRESETS: dict[str, SUVConfig] = {
    # The released Open-Sora Plan v1.5 denoiser.
    "osp-v1.5-8.5b": SUVConfig(),
    # The config of the upstream golden vector (tests/data/golden/suv_tiny_L2-2-2_S1-2-1_fp32.*).
    "tiny": SUVConfig(
        num_layers=(2, 2, 2), sparse_n=(1, 2, 1), num_heads=2, head_dim=16, in_channels=4, out_channels=4,
        timestep_embed_dim=16, caption_channels=24, pooled_projection_dim=20,
    ),
    # Tests and the quickstart: 5 stages with k up to 4, 4 heads (TP up to 4).
    "small": SUVConfig(
        num_layers=(2, 2, 2, 2, 2), sparse_n=(1, 2, 4, 2, 1), num_heads=4, head_dim=16, in_channels=4,
        out_channels=4, timestep_embed_dim=32, caption_channels=24, pooled_projection_dim=20,
    ),
}


def suv_config(name: str, **overrides: object) -> SUVConfig:
    """A preset by name, with field overrides (e.g. `suv_config("small", sparse_n=(1, 1, 1, 1, 1))`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown SUV preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


__all__ = ["AttentionMode", "BlockSpec", "PRESETS", "megatron_config", "SUVConfig", "skip_partner", "suv_config"]
