"""Glue between the inpainting pieces and the shared training loop (`pretrain(..., setup=...)`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_video.inpaint.conditioning import InpaintConditioner, condition_channels
from megatron_video.inpaint.config import InpaintConfig


def check_i2v_configs(inpaint: InpaintConfig, model_config: Any, data_config: Any) -> None:
    """Everything that can be checked from the config files alone (before any process group or model)."""
    expected = condition_channels(model_config.in_channels)
    if model_config.condition_channels != expected:
        raise ValueError(f"the model config needs condition_channels = in_channels + 8 = {expected} "
                         f"(masked-video latents + folded frame mask), got {model_config.condition_channels}")
    if inpaint.masked_latents == "encode" and getattr(data_config, "cache_path", None):
        raise ValueError("masked_latents 'encode' VAE-encodes the masked video, which the feature cache does not "
                         "hold: use online encoding (no cache_path) or masked_latents 'latent_mask'")


def check_i2v_args(args: argparse.Namespace) -> None:
    """The image-to-video checks of training/preflight.py: the T2V checkpoint directory, the inpainting config
    and its fit with the model and data configs. Raises ValueError (ConfigError) naming the problem."""
    from megatron_video.inpaint.config import load_inpaint_config

    if args.init_from_t2v is not None and not Path(args.init_from_t2v).is_dir():
        raise ValueError(f"--init-from-t2v: checkpoint directory not found: {args.init_from_t2v}")
    inpaint = load_inpaint_config(args.inpaint_config)
    if args.model_config is not None and args.data_config is not None:
        check_i2v_configs(inpaint, args.model_config, args.data_config)


def add_i2v_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("image-to-video / inpainting")
    g.add_argument("--inpaint-config", type=str, required=True,
                   help="YAML/JSON: task mix, kept-frame bounds, progressive stages (examples/i2v/inpaint.yaml)")
    g.add_argument("--init-from-t2v", type=str, default=None,
                   help="T2V checkpoint directory to start from (new input weights start at zero); "
                        "ignored when --load resumes an I2V run")


def i2v_setup(inpaint: InpaintConfig) -> Callable[[argparse.Namespace, Any, Any], InpaintConditioner]:
    """The loop's `setup` hook: initialise from T2V if asked, and return the per-micro-batch conditioner."""

    def setup(args: argparse.Namespace, parts: Any, encoder: Any) -> InpaintConditioner:
        from megatron_video.training.save_dir import resume_iteration

        check_i2v_configs(inpaint, parts.module.cfg, args.data_config)
        if inpaint.masked_latents == "encode":
            if not encoder.has_vae:
                raise ValueError("masked_latents 'encode' needs the WF-VAE: give --vae-path (and --vae-config)")
            encoder.keep_video = True
        # a --load that holds no checkpoint yet (--load = --save, the job's first run) resumes nothing
        resuming = args.load is not None and resume_iteration(args.load) is not None
        if args.init_from_t2v and not resuming:
            import torch.distributed as dist

            from megatron_video.inpaint.init_t2v import init_from_t2v

            iteration = init_from_t2v(args, parts, args.init_from_t2v)
            if dist.get_rank() == 0:
                print(f"initialised from T2V checkpoint {args.init_from_t2v} (iteration {iteration}); "
                      "conditioning weights zero", flush=True)
        vae = encoder.shared_vae() if encoder.has_vae else None  # run on one rank of the replica, shared
        return InpaintConditioner(inpaint, args.seed, vae, encoder.vae_chunk)

    return setup


__all__ = ["add_i2v_args", "check_i2v_configs", "i2v_setup"]
