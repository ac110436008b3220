"""Synthetic checkpoints shaped like MindSpeed-MM's and the Open-Sora Plan fork's (written here, from what their
code saves; no file of theirs is copied).

- Megatron's legacy layout: `<root>/latest_checkpointed_iteration.txt` holding the iteration or `release`
  (MindSpeed-MM checkpoint/sora_model/convert_utils/save_load_utils.py `save_as_mm` writes `release`), then
  `iter_XXXXXXX/` or `release/` with `mp_rank_TT[_PPP]/model_optim_rng.pt`.
- A training save (Megatron `save_checkpoint`) holds `args` (an argparse.Namespace), `checkpoint_version` 3.0,
  `iteration`, `model`, and RNG states with numpy arrays; the fork adds `ema_model` (`--use-ema`,
  examples/opensoraplan1.5/convert_mm_to_ckpt.py reads it). A converter save (`save_as_mm`) holds only `model`.
- MindSpeed-MM renames the attention modules (checkpoint/sora_model/opensoraplan_converter.py, v1.5
  `str_replace_mapping`) and its last block has no text output path (sparseu_mmdit.py: `double_ff and not last`,
  `context_pre_only`); the fork keeps the released names and the `._extra_state` None entries.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoints_convert.layout import tp_slice
from checkpoints_convert.mindspeed import to_mindspeed_key
from checkpoints_convert.schema import released_schema
from megatron_video.models.suv_mmdit.config import SUVConfig


def _training_extras(tp: int, iteration: int) -> dict[str, Any]:
    args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, bf16=True,
                              params_dtype=torch.bfloat16, mm_model="pretrain_model.json")
    rng = {"random_rng_state": random.Random(0).getstate(), "np_rng_state": np.random.RandomState(0).get_state(),
           "torch_rng_state": torch.get_rng_state()}
    return {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "rng_state": [rng]}


def full_state(tensors: dict[str, torch.Tensor], cfg: SUVConfig, extra_state: bool,
               last_block_text: bool) -> dict[str, Any]:
    """Released-name entries in file order: the tensors, plus None `._extra_state` entries if asked."""
    out: dict[str, Any] = {}
    for key, shape in released_schema(cfg, last_block_text).items():
        if shape is not None:
            out[key] = tensors[key]
        elif extra_state:
            out[key] = None
    return out


def write_upstream_checkpoint(root: Path, entries: dict[str, dict[str, Any]], tp: int, iteration: int | None,
                              rename: bool, extras: dict[str, Any] | None = None) -> Path:
    """`entries` ({"model": released-name state, "ema_model": ...}) as TP rank files under `root`; `iteration`
    None writes a `release` checkpoint holding only the entries."""
    name = "release" if iteration is None else f"iter_{iteration:07d}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release" if iteration is None else str(iteration))
    for rank in range(tp):
        folder = root / name / f"mp_rank_{rank:02d}"
        folder.mkdir(parents=True)
        obj: dict[str, Any] = {} if iteration is None else _training_extras(tp, iteration)
        for entry, state in entries.items():
            obj[entry] = {(to_mindspeed_key(k) if rename else k):
                          (tp_slice(k, v, tp, rank).clone() if isinstance(v, torch.Tensor) else v)
                          for k, v in state.items()}
        obj.update(extras or {})
        torch.save(obj, folder / "model_optim_rng.pt")
    return root
