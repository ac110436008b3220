"""EMA of the weights in fp32, sharded like the distributed optimizer's state.

Each data-parallel rank keeps the EMA of exactly the fp32 main-parameter shards its optimizer steps
(`DistributedOptimizer.shard_fp32_from_float16_groups` / `shard_fp32_groups`, ranges from the optimizer's
`gbuf_ranges`), so EMA memory is 4 bytes/param / DP like the optimizer's. Without the distributed optimizer
every rank holds the whole (TP/PP-local) model. Call `update()` after each optimizer step that was actually
taken (not after a skipped step): ema ← decay·ema + (1 − decay)·main_param.

`state_dict()` holds only this rank's shards (with their ranges, so a load into another layout fails loudly);
`full_state_dict()` gathers the full EMA tensors keyed by model parameter name (a collective over the data-
parallel group; still TP-sharded and PP-local, as the model's own state dict); `load_full_state_dict()` takes
such a dict and keeps this rank's shard, which is how to resume with a different DP size.
`sharded_state_dict(model.sharded_state_dict())` gives dist_checkpointing entries of this rank's shards only, which
reshard over TP/PP/DP like the model weights (save them under their own top-level key, e.g. "ema"); load them back
with `load_sharded_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_video.optim.adaptive_optimizer import AdaptiveClipOptimizer, leaf_optimizers


@dataclass
class _Shard:
    name: str
    shape: torch.Size
    start: int  # range of the flattened parameter held here
    end: int
    main: torch.Tensor | None  # the optimizer's fp32 main shard (None if this rank holds none of it)
    group: dist.ProcessGroup | None  # ranks that together hold the whole parameter (None: held whole)
    device: torch.device


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip megatron's DDP / Float16Module wrappers (both keep the wrapped model as `.module`)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def param_names(model_chunks: list[torch.nn.Module]) -> dict[torch.nn.Parameter, str]:
    """Model parameter → name (prefixed `chunk{i}.` only with several virtual-pipeline chunks)."""
    names: dict[torch.nn.Parameter, str] = {}
    for i, chunk in enumerate(model_chunks):
        prefix = f"chunk{i}." if len(model_chunks) > 1 else ""
        for name, param in unwrap_model(chunk).named_parameters():
            names.setdefault(param, prefix + name)
    return names


def _distributed_shards(opt: Any, names: dict[torch.nn.Parameter, str]) -> list[_Shard]:
    owned: dict[torch.nn.Parameter, torch.Tensor] = {}
    for model_groups, main_groups in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                                      (opt.model_fp32_groups, opt.shard_fp32_groups)):
        for model_group, main_group in zip(model_groups, main_groups, strict=True):
            for model_param, main_param in zip(model_group, main_group, strict=True):
                if main_param is None:
                    raise NotImplementedError(
                        "EMA needs fp32 main params (the precision-aware optimizer is not supported)")
                owned[model_param] = main_param
    shards = []
    # Every DP rank walks all parameters of the optimizer's buffers in the same order (the gather needs it).
    for buffer in opt.buffers:
        for param in buffer.param_index_map:
            if param not in names:
                raise KeyError("a parameter of the optimizer's buffers is not in the given model chunks")
            start = end = 0
            if param in owned:
                gbuf_index, dtype, bucket_index = opt.model_param_gbuf_map[param]
                prange = opt.gbuf_ranges[gbuf_index][dtype][bucket_index]["param_map"][param]["param"]
                start, end = prange.start, prange.end
            shards.append(_Shard(names[param], param.shape, start, end, owned.get(param),
                                 opt.data_parallel_group, param.device))
    return shards


def _replicated_shards(opt: Any, names: dict[torch.nn.Parameter, str]) -> list[_Shard]:
    # Float16OptimizerWithFloat16Params keeps fp32 copies; FP32Optimizer steps the model params themselves.
    pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    if hasattr(opt, "float16_groups"):
        for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True):
            pairs += list(zip(model_group, main_group, strict=True))
        for group in opt.fp32_from_fp32_groups:
            pairs += [(p, p) for p in group]
    else:
        for group in opt.optimizer.param_groups:
            pairs += [(p, p) for p in group["params"]]
    return [_Shard(names[p], p.shape, 0, p.numel(), main, None, p.device) for p, main in pairs]


class ShardedEMA:
    """fp32 EMA of the weights, one shard per data-parallel rank (see module docstring)."""

    def __init__(self, optimizer: Any, model_chunks: list[torch.nn.Module], decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        inner = optimizer.optimizer if isinstance(optimizer, AdaptiveClipOptimizer) else optimizer
        names = param_names(model_chunks)
        self.decay = decay
        self.num_updates = 0
        self._shards: list[_Shard] = []
        for opt in leaf_optimizers(inner):
            if hasattr(opt, "shard_fp32_groups"):
                self._shards += _distributed_shards(opt, names)
            else:
                self._shards += _replicated_shards(opt, names)
        seen = set()
        for shard in self._shards:
            if shard.name in seen:
                raise ValueError(f"parameter {shard.name} appears twice in the optimizer")
            seen.add(shard.name)
        for shard in self._shards:
            if shard.main is not None and (shard.main.dtype != torch.float32 or not shard.main.is_contiguous()):
                raise TypeError(f"main param of {shard.name} is not a contiguous fp32 tensor")
        # The EMA starts at the current fp32 main weights. The flat main views stay valid: the optimizer
        # updates its main params in place.
        owned = [s for s in self._shards if s.main is not None]
        self.ema: dict[str, torch.Tensor] = {s.name: s.main.detach().reshape(-1).clone() for s in owned}
        self._ema_list = [self.ema[s.name] for s in owned]
        self._main_list = [s.main.detach().reshape(-1) for s in owned]

    @torch.no_grad()
    def update(self) -> None:
        """ema ← decay·ema + (1 − decay)·main (call after an optimizer step that was taken)."""
        if self._ema_list:
            torch._foreach_lerp_(self._ema_list, self._main_list, 1.0 - self.decay)
        self.num_updates += 1

    def param_names(self) -> set[str]:
        """Names of every parameter the EMA tracks (on any DP rank)."""
        return {s.name for s in self._shards}

    def local_numel(self) -> int:
        return sum(t.numel() for t in self.ema.values())

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards {name: {"ema": flat fp32 tensor, "start", "end", "shape"}} and the counters."""
        shards = {
            s.name: {"ema": self.ema[s.name], "start": s.start, "end": s.end, "shape": list(s.shape)}
            for s in self._shards if s.main is not None
        }
        return {"decay": self.decay, "num_updates": self.num_updates, "shards": shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shards = state["shards"]
        expected = {s.name: s for s in self._shards if s.main is not None}
        if set(shards) != set(expected):
            missing, extra = sorted(set(expected) - set(shards)), sorted(set(shards) - set(expected))
            raise KeyError(f"EMA shard names differ (missing {missing[:5]}, unexpected {extra[:5]}); "
                           "for another parallel layout use load_full_state_dict")
        for name, shard in expected.items():
            item = shards[name]
            mine = (shard.start, shard.end, list(shard.shape))
            if (item["start"], item["end"], list(item["shape"])) != mine:
                raise ValueError(f"EMA shard {name} covers [{item['start']}, {item['end']}) of "
                                 f"{item['shape']}, this rank owns [{mine[0]}, {mine[1]}) of {mine[2]}")
        for name in expected:
            self.ema[name].copy_(shards[name]["ema"])
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors by parameter name. Collective: every rank of each DP group must call it."""
        out: dict[str, torch.Tensor] = {}
        for shard in self._shards:
            if shard.group is None:
                out[shard.name] = self.ema[shard.name].view(shard.shape).clone()
                continue
            flat = torch.zeros(shard.shape.numel(), dtype=torch.float32, device=shard.device)
            if shard.main is not None:
                flat[shard.start:shard.end] = self.ema[shard.name]
            # The DP shards are disjoint and cover the parameter: a sum assembles it.
            dist.all_reduce(flat, group=shard.group)
            out[shard.name] = flat.view(shard.shape)
        return out

    @torch.no_grad()
    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Take this rank's shard of each full EMA tensor (no communication)."""
        for shard in self._shards:
            if shard.name not in full:
                raise KeyError(f"EMA tensor for {shard.name} missing")
            tensor = full[shard.name]
            if tuple(tensor.shape) != tuple(shard.shape):
                raise ValueError(f"EMA tensor {shard.name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(shard.shape)}")
            if shard.main is not None:
                self.ema[shard.name].copy_(tensor.reshape(-1)[shard.start:shard.end].float())

    def sharded_state_dict(
        self, model_sharded_state_dict: dict[str, Any], prefix: str = "ema."
    ) -> dict[str, Any]:
        """dist_checkpointing entries for the EMA this rank holds, keyed by parameter name: its range of each
        parameter it holds any of as ShardedTensors placed in the model's global tensor (checkpoint key
        `prefix` + the model entry's key; see `training/checkpoint_state.py`). No communication and no copy, and
        they reshard over TP/PP/DP like the model weights. After `dist_checkpointing.load`, pass the loaded dict to
        `load_sharded_state_dict`. The update count is not included: keep `num_updates` in the common state."""
        from megatron_video.training.checkpoint_state import range_shards, replica_without_dp

        # Wrappers (DDP, Float16Module) prefix the model keys with "module."; parameter names lack it.
        by_name = {}
        for key, entry in model_sharded_state_dict.items():
            while key.startswith("module."):
                key = key[len("module."):]
            by_name[key] = entry
        out: dict[str, Any] = {}
        for shard in self._shards:
            entry = by_name.get(shard.name)
            if entry is None or not hasattr(entry, "global_offset"):
                raise KeyError(f"the model's sharded state dict has no ShardedTensor for parameter {shard.name}")
            if shard.main is None:
                continue  # other DP ranks hold all of it (no empty entry: rank 0's common state must fit all)
            replica = replica_without_dp(entry.replica_id) if shard.group is not None else entry.replica_id
            out[shard.name] = range_shards(prefix + entry.key, self.ema[shard.name], shard.start, shard.end,
                                           entry, replica)
        return out

    @torch.no_grad()
    def load_sharded_state_dict(self, loaded: dict[str, Any]) -> None:
        """Take the values `dist_checkpointing.load` returned for `sharded_state_dict()`'s entries."""
        from megatron_video.training.checkpoint_state import joined

        for shard in self._shards:
            if shard.main is not None:
                if shard.name not in loaded:
                    raise KeyError(f"EMA tensor for {shard.name} missing")
                self.ema[shard.name].copy_(joined(loaded[shard.name]))
