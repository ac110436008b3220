"""Videos during training: every --sample-interval iterations the model (or its EMA with --eval-ema) samples the
fixed prompts of --sample-prompts with fixed seeds (--seed + i); the decoded videos go to TensorBoard.

Inpainting models (pretrain_i2v.py) sample image-to-video: every prompt starts from the first frame of
--sample-cond-image, conditioned by the inpainting config's `masked_latents` convention as in training.

Structure-controller runs (pretrain_control.py) sample under the structure signal of --sample-structure-video.

Every rank of every replica samples every prompt (the model's TP / CP / PP ranks must run together; replicas
repeat the work instead of exchanging videos), and the TensorBoard rank (the last) decodes and logs them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from megatron_video.sampling.cli import (
    SampleInputError,
    build_vae,
    check_shape,
    check_structure_fit,
    latent_size,
    read_condition_video,
    read_lines,
    structure_signal,
    task_condition,
    text_encoder,
    vae_factors,
)


def add_training_sample_args(group: Any) -> None:
    group.add_argument("--sample-interval", type=int, default=None,
                       help="iterations between sampling the --sample-prompts to TensorBoard (default: never)")
    group.add_argument("--sample-prompts", type=str, default=None, help="text file, one prompt per line")
    group.add_argument("--sample-shape", type=str, default=None, metavar="T,H,W",
                       help="frames, height, width (default: the data config's shape)")
    group.add_argument("--sample-num-steps", type=int, default=50, help="Euler steps per training-time sample")
    group.add_argument("--sample-guidance-scale", type=float, default=7.5,
                       help="classifier-free guidance scale of the training-time samples (0: no guidance)")
    group.add_argument("--sample-encoders", choices=("osp", "stub"), default="osp",
                       help="text encoders for the prompts: T5 + CLIP (--t5-path/--clip-path) or the stand-in")
    group.add_argument("--sample-stand-in-vae", type=int, default=None, metavar="FACTOR",
                       help="decode with the space-to-depth stand-in VAE instead of the WF-VAE (--vae-path)")
    group.add_argument("--sample-cond-image", type=str, default=None,
                       help="inpainting (i2v) models: an image or video file of the sample size whose first frame "
                            "every training-time sample starts from (image-to-video)")
    group.add_argument("--sample-structure-video", type=str, default=None,
                       help="structure-controller runs (pretrain_control.py): the structure every training-time "
                            "sample follows, a video of the sample size (its --structure-signal is extracted) or a "
                            ".safetensors file holding a computed uint8 `structure` (1, T, H, W)")


def sample_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    if args.sample_shape:
        try:
            t, h, w = (int(v) for v in args.sample_shape.split(","))
        except ValueError as exc:
            raise SampleInputError(f"--sample-shape {args.sample_shape!r} is not T,H,W") from exc
        return t, h, w
    shape = args.data_config.shape
    return shape.num_frames, shape.height, shape.width


def check_sample_args(args: argparse.Namespace) -> list[str]:
    """Before anything heavy: the prompt file, the shape against the VAE and the model; returns the prompts."""
    if args.sample_interval is None:
        return []
    if args.sample_interval < 1:
        raise SampleInputError(f"--sample-interval must be >= 1, got {args.sample_interval}")
    if not args.sample_prompts:
        raise SampleInputError("--sample-interval needs --sample-prompts")
    prompts = read_lines(args.sample_prompts, "--sample-prompts")
    if not prompts:
        raise SampleInputError(f"--sample-prompts: {args.sample_prompts} holds no prompt")
    if args.sample_stand_in_vae is None and args.vae_path is None:
        raise SampleInputError("--sample-interval needs --vae-path or --sample-stand-in-vae to decode")
    if args.sample_encoders == "osp" and not (args.t5_path and args.clip_path):
        raise SampleInputError("--sample-encoders osp needs --t5-path and --clip-path")
    cfg = args.model_config
    factors = vae_factors(args.sample_stand_in_vae, args.vae_config)
    check_shape(cfg, factors, *sample_shape(args), flags=("--sample-shape T", "--sample-shape H", "--sample-shape W"))
    if cfg.condition_channels:
        check_inpaint_sample_args(args, factors[0])
    elif args.sample_cond_image is not None:
        raise SampleInputError("--sample-cond-image conditions inpainting models; this model config has no "
                               "condition_channels")
    if getattr(args, "structure_signal", None) is not None:
        check_structure_sample_args(args, factors)
    elif args.sample_structure_video is not None:
        raise SampleInputError("--sample-structure-video is for structure-controller runs (pretrain_control.py)")
    return prompts


def check_structure_sample_args(args: argparse.Namespace, factors: tuple[int, int]) -> None:
    """A controller run's samples follow --sample-structure-video: present, of a size the controller folds to the
    sample latent, its signal computable here (a video needs the signal's model, even when training reads
    signals from a feature cache)."""
    from megatron_video.control.training import control_config

    path = args.sample_structure_video
    if path is None:
        raise SampleInputError("--sample-interval in a structure-controller run needs --sample-structure-video (the "
                               "structure every sample follows)")
    if not Path(path).is_file():
        raise SampleInputError(f"--sample-structure-video: file not found: {path}")
    check_structure_fit(control_config(args), "--control-*-downsample", args.structure_signal, args.model_config,
                        factors, sample_shape(args), path, "--sample-structure-video", args.structure_model,
                        args.structure_sketch_arch)


def check_inpaint_sample_args(args: argparse.Namespace, temporal_factor: int) -> None:
    """An inpainting model samples image-to-video: the conditioning image, the VAE's frame folding, the config."""
    from megatron_video.inpaint.folding import TIME_STRIDE

    if getattr(args, "inpaint_config", None) is None:
        raise SampleInputError("--sample-interval with an inpainting model (condition_channels > 0) runs under "
                               "pretrain_i2v.py (--inpaint-config gives the conditioning convention)")
    if args.sample_cond_image is None:
        raise SampleInputError("--sample-interval with an inpainting model needs --sample-cond-image (the first "
                               "frame the samples start from)")
    if temporal_factor != TIME_STRIDE:
        raise SampleInputError(f"the inpainting masks fold {TIME_STRIDE} frames per latent frame as trained; the "
                               f"sampling VAE compresses time by {temporal_factor} (use the WF-VAE, --vae-path)")
    read_condition_video(args.sample_cond_image, *sample_shape(args))  # exists, readable, the sample size


class TrainingSampler:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        from megatron_video.sampling.sampler import SamplerConfig

        self.args, self.device = args, device
        self.prompts = check_sample_args(args)
        cfg = args.model_config
        factors = vae_factors(args.sample_stand_in_vae, args.vae_config)
        self.latent = latent_size(cfg, factors, *sample_shape(args))
        self.encode_text = text_encoder(args.sample_encoders, args.t5_path, args.clip_path, cfg, device)
        self.vae = build_vae(args.sample_stand_in_vae, args.vae_path, args.vae_config, device)
        self.config = SamplerConfig(num_steps=args.sample_num_steps, guidance_scale=args.sample_guidance_scale)
        self.condition = None
        if cfg.condition_channels:  # image-to-video from the first frame of --sample-cond-image
            from megatron_video.inpaint.config import load_inpaint_config

            video = read_condition_video(args.sample_cond_image, *sample_shape(args)).to(device)
            self.condition = task_condition("i2v", video, self.vae, self.latent[1:],
                                            load_inpaint_config(args.inpaint_config).masked_latents,
                                            chunk_size=args.vae_chunk_size)
        self.structure = None
        if getattr(args, "structure_signal", None) is not None:  # a structure controller on its frozen base
            self.structure = structure_signal(args.sample_structure_video, args.structure_signal, sample_shape(args),
                                              args.structure_model, args.structure_sketch_arch, device,
                                              "--sample-structure-video")
        self.fps = args.data_config.shape.fps

    def due(self, iteration: int) -> bool:
        return iteration % self.args.sample_interval == 0

    def run(self, parts: Any, iteration: int, log: Any) -> list[torch.Tensor]:
        """Sample every prompt; returns the decoded videos on the logging rank (empty elsewhere)."""
        from megatron_video.evaluation.runner import evaluation_weights
        from megatron_video.sampling.sampler import initial_noise, sample
        from megatron_video.sampling.video import log_video, to_frames

        use_ema = self.args.eval_ema and parts.ema is not None
        videos = []
        with evaluation_weights(parts, use_ema):
            for index, prompt in enumerate(self.prompts):
                noise = initial_noise(self.latent, [self.args.seed + index], self.device)
                negative = self.encode_text([""]) if self.config.guidance_scale != 1.0 else None
                latents = sample(parts.model, parts.module, noise, self.encode_text([prompt]), self.config, negative,
                                 self.condition, structure=self.structure)
                if log.writer is not None:
                    video = self.vae.decode(latents, chunk_size=self.args.vae_chunk_size)[0].float()
                    log_video(log.writer, f"samples/{index:02d}", to_frames(video), iteration, self.fps)
                    videos.append(video)
        if log.writer is not None:
            log.writer.flush()
        log.info("sampled %d prompt(s) at iteration %d (%s weights%s)", len(self.prompts), iteration,
                 "EMA" if use_ema else "model", ", image-to-video" if self.condition is not None else
                 f", {self.args.structure_signal} structure" if self.structure is not None else "")
        return videos


__all__ = ["TrainingSampler", "add_training_sample_args", "check_inpaint_sample_args", "check_sample_args",
           "check_structure_sample_args", "sample_shape"]
