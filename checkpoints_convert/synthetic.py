"""Random weights in the released schema of any config, written streaming (tests and the benchmark)."""

from __future__ import annotations

from pathlib import Path

import torch

from checkpoints_convert.schema import released_schema
from checkpoints_convert.tensorio import MappedSafetensors, SafetensorsWriter, save_pt_from_safetensors
from megatron_video.models.suv_mmdit.config import SUVConfig

_POOL = 1 << 24  # values drawn once for `fast` files; each tensor takes a different window of them


def write_random_released(path: str | Path, cfg: SUVConfig, last_block_text: bool = True,
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0, fast: bool = False,
                          pt: str | Path | None = None) -> Path:
    """A released-schema safetensors file of random values (and, with `pt`, the same as a `.pt` holding the
    None `._extra_state` entries too, like the released `model_ema.pt`). `fast` copies windows of one random
    pool instead of drawing every value (distinct per tensor, cheap enough for 8.5B)."""
    schema = released_schema(cfg, last_block_text)
    tensors = {k: s for k, s in schema.items() if s is not None}
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 * _POOL, generator=g).to(dtype) if fast else None
    writer = SafetensorsWriter(path, {k: (dtype, s) for k, s in tensors.items()}, metadata={"format": "pt"})
    for index, (key, shape) in enumerate(tensors.items()):
        numel = 1
        for s in shape:
            numel *= s
        if pool is None:
            value = torch.randn(shape, generator=g).to(dtype)
        else:
            parts, offset = [], (index * 7919) % _POOL
            while numel > sum(p.numel() for p in parts):
                take = min(_POOL, numel - sum(p.numel() for p in parts))
                parts.append(pool[offset:offset + take])
                offset = (offset + 104729) % _POOL
            value = torch.cat(parts).reshape(shape) + index  # + index: no two tensors alike
        writer.write(key, value)
    written = writer.close()
    if pt is not None:
        layout = {k: (k if s is not None else None) for k, s in schema.items()}
        save_pt_from_safetensors(MappedSafetensors(written), pt, layout)
    return written


__all__ = ["write_random_released"]
