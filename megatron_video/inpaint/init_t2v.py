"""Start an inpainting (I2V) model from a text-to-video checkpoint.

The I2V model has every T2V parameter with the same name and shape plus the conditioning part of the patch
embedding (`patch_embed.cond_proj.weight`, see models/suv_mmdit/model.py). The T2V checkpoint is loaded into
all the others (TP / PP resharding as any dist_checkpointing load); the new weights are set to zero, so the
I2V model then computes exactly what the T2V model computes, whatever the conditioning input.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

NEW_PREFIX = "patch_embed.cond_proj."


def new_parameter_names(module: torch.nn.Module) -> list[str]:
    return [name for name in module.state_dict() if name.startswith(NEW_PREFIX)]


def load_t2v_checkpoint(module: torch.nn.Module, root: str) -> int:
    """Load the model weights of the T2V dist checkpoint under `root` (latest iteration) into `module`,
    zero the conditioning weights; returns the checkpoint's iteration."""
    from megatron_video.training.checkpointing import load_checkpoint, model_sharded_state_dict

    new = set(new_parameter_names(module))
    sharded = {k: v for k, v in model_sharded_state_dict(module).items() if k not in new}
    iteration, loaded, _ = load_checkpoint(root, lambda: {"model": sharded})
    result = module.load_state_dict(loaded["model"], strict=False)
    if result.unexpected_keys or set(result.missing_keys) != new:
        raise RuntimeError(f"T2V checkpoint {root} does not fit this model: missing "
                           f"{sorted(set(result.missing_keys) - new)}, unexpected {result.unexpected_keys}")
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in new:
                param.zero_()
    return iteration


def init_from_t2v(args: argparse.Namespace, parts: Any, root: str) -> int:
    """`load_t2v_checkpoint` into the training components: the optimizer's main weights and the EMA restart
    from the loaded weights (as a --finetune load does)."""
    iteration = load_t2v_checkpoint(parts.module, root)
    parts.optimizer.reload_model_params()
    if parts.ema is not None:
        parts.ema.load_full_state_dict({name: param.detach().float()
                                        for name, param in parts.module.named_parameters()})
    return iteration


__all__ = ["init_from_t2v", "load_t2v_checkpoint", "new_parameter_names"]
