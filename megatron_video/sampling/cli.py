"""`tools/sample.py`: videos from one of our checkpoints (model or EMA weights) or from released weights.

Every input is checked before any weights load (prompt files, frame and size divisibility, guidance prompts,
the weights' shapes against the model config); a bad one is one message from rank 0 and exit code 2.
Under torchrun the model runs at the given TP / CP / PP layout; data-parallel replicas share out the prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_video.sampling.conditioning import SAMPLING_TASKS
from megatron_video.training.checkpointing import latest_iteration


class SampleInputError(ValueError):
    """A bad sampling input, found before any weights load."""


def add_sample_args(parser: argparse.ArgumentParser) -> None:
    from megatron_video.control.signals import add_signal_source_args

    g = parser.add_argument_group("sampling (tools/sample.py)")
    g.add_argument("--prompts", type=str, required=True, help="text file, one prompt per line")
    g.add_argument("--negative-prompt", type=str, default="", help="one negative prompt for every sample")
    g.add_argument("--negative-prompts", type=str, default=None,
                   help="text file of negative prompts: one for all, or one per prompt (replaces --negative-prompt)")
    g.add_argument("--released", type=str, default=None,
                   help="released-format weights (.safetensors, .pt or a diffusers folder) instead of --load")
    g.add_argument("--weights", choices=("model", "ema"), default="ema", help="which weights of a --load checkpoint")
    g.add_argument("--num-frames", type=int, default=121,
                   help="frames of each video: 1 + a multiple of the VAE's temporal factor")
    g.add_argument("--height", type=int, default=288, help="video height in pixels")
    g.add_argument("--width", type=int, default=512, help="video width in pixels")
    g.add_argument("--fps", type=float, default=24.0, help="frame rate written into the MP4 files")
    g.add_argument("--num-steps", type=int, default=50, help="rectified-flow Euler steps")
    g.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale (0: none)")
    g.add_argument("--encoders", choices=("osp", "stub"), default="osp",
                   help="text encoders: T5 + CLIP from --t5-path/--clip-path, or the deterministic stand-in")
    g.add_argument("--stand-in-vae", type=int, default=None, metavar="FACTOR",
                   help="decode with the space-to-depth stand-in VAE of this factor (the quickstart's) instead "
                        "of the WF-VAE (--vae-path)")
    g.add_argument("--task", choices=SAMPLING_TASKS, default="t2v", help="inpainting models: the conditioning task")
    g.add_argument("--cond-video", type=str, default=None, help="the given frames (a video or image file)")
    g.add_argument("--cond-frames", type=int, default=1, help="continuation: how many leading frames are given")
    g.add_argument("--masked-latents", choices=("encode", "latent_mask"), default="encode",
                   help="the conditioning convention the model was trained with (inpaint config)")
    g.add_argument("--controller", type=str, default=None,
                   help="a structure controller exported by tools/export_control.py: sample under --structure-video")
    g.add_argument("--structure-video", type=str, default=None,
                   help="with --controller: the structure source, a video of the sampling size (its signal is "
                        "extracted) or a .safetensors file holding a computed `structure` (uint8 (1, T, H, W), as the "
                        "feature cache stores it)")
    add_signal_source_args(g)  # depth / sketch controllers
    g.add_argument("--out", type=str, required=True, help="output directory (MP4 files, latents, index)")


def read_lines(path: str, what: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise SampleInputError(f"{what}: file not found: {path}")
    lines = [line.strip() for line in file.read_text().splitlines()]
    return [line for line in lines if line]


def vae_factors(stand_in: int | None, vae_config: str | None) -> tuple[int, int, int]:
    """(temporal, spatial, latent channels) of the decoder: the space-to-depth stand-in or the WF-VAE."""
    if stand_in is not None:
        from megatron_video.models.space_to_depth import SpaceToDepthVAE

        return 1, stand_in, SpaceToDepthVAE(stand_in).latent_channels
    from megatron_video.models.wfvae import WFVAEConfig
    from megatron_video.models.wfvae.model import COMPRESSION

    config = WFVAEConfig.from_dict(json.loads(Path(vae_config).read_text())) if vae_config else WFVAEConfig()
    return COMPRESSION, COMPRESSION, config.latent_dim


def check_shape(cfg: Any, factors: tuple[int, int, int], num_frames: int, height: int, width: int,
                flags: tuple[str, str, str] = ("--num-frames", "--height", "--width")) -> None:
    temporal, spatial, channels = factors
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise SampleInputError(f"{flags[0]} {num_frames}: the VAE needs {temporal}n+1 frames")
    step = spatial * cfg.patch_size
    for flag, value in ((flags[1], height), (flags[2], width)):
        if value < step or value % step:
            raise SampleInputError(f"{flag} {value} is not a multiple of VAE factor x patch = {spatial} x "
                                   f"{cfg.patch_size} = {step}")
    if channels != cfg.in_channels:
        raise SampleInputError(f"the VAE gives {channels} latent channels, the model config takes {cfg.in_channels}")


def check_inputs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Everything checkable without weights; returns (prompts, negative prompts)."""
    cfg = args.model_config
    if cfg is None:
        raise SampleInputError("--model-config is required")
    if (args.load is None) == (args.released is None):
        raise SampleInputError("give the weights with exactly one of --load (our checkpoint) and --released")
    prompts = read_lines(args.prompts, "--prompts")
    if not prompts:
        raise SampleInputError(f"--prompts: {args.prompts} holds no prompt")
    negatives = read_lines(args.negative_prompts, "--negative-prompts") if args.negative_prompts \
        else [args.negative_prompt]
    if args.negative_prompts and not negatives:
        raise SampleInputError(f"--negative-prompts: {args.negative_prompts} holds no prompt")
    if len(negatives) not in (1, len(prompts)):
        raise SampleInputError(f"{len(negatives)} guidance (negative) prompts for {len(prompts)} samples: give one, "
                               "or one per prompt")
    if args.stand_in_vae is None and args.vae_path is None:
        raise SampleInputError("give --vae-path (the WF-VAE) or --stand-in-vae FACTOR to decode the latents")
    check_shape(cfg, vae_factors(args.stand_in_vae, args.vae_config), args.num_frames, args.height, args.width)
    if args.num_steps < 1 or args.guidance_scale < 0:
        raise SampleInputError("--num-steps must be >= 1 and --guidance-scale >= 0")
    if cfg.condition_channels == 0 and args.task != "t2v":
        raise SampleInputError(f"--task {args.task} needs an inpainting model (condition_channels > 0)")
    if cfg.condition_channels and args.task != "t2v" and not (args.cond_video and Path(args.cond_video).is_file()):
        raise SampleInputError(f"--task {args.task} needs --cond-video (an existing file)")
    if cfg.condition_channels and args.task != "t2v" and args.stand_in_vae is not None:
        raise SampleInputError(f"--task {args.task} needs the WF-VAE (--vae-path): the inpainting masks fold frames "
                               "by its 8x temporal compression, which the --stand-in-vae stand-in does not have")
    if args.encoders == "osp" and not (args.t5_path and args.clip_path):
        raise SampleInputError("--encoders osp needs --t5-path and --clip-path (or --encoders stub)")
    if args.released is not None and not Path(args.released).exists():
        raise SampleInputError(f"--released: not found: {args.released}")
    if args.load is not None and latest_iteration(args.load) is None:
        raise SampleInputError(f"--load {args.load}: no complete checkpoint there (latest_checkpointed_iteration.txt)")
    if args.controller is not None or args.structure_video is not None:
        check_structure_inputs(args)
    return prompts, negatives


def check_structure_inputs(args: argparse.Namespace) -> None:
    """--controller and --structure-video: both given, readable, and fitting the model and the sampling size."""
    from megatron_video.control.export import controller_metadata

    if args.controller is None or args.structure_video is None:
        raise SampleInputError("structure control needs both --controller and --structure-video")
    for flag, path in (("--controller", args.controller), ("--structure-video", args.structure_video)):
        if not Path(path).is_file():
            raise SampleInputError(f"{flag}: file not found: {path}")
    if args.model_config.condition_channels:
        raise SampleInputError("--controller: structure control runs on a text-to-video model, not an inpainting one")
    try:
        metadata, control = controller_metadata(args.controller)
    except ValueError as exc:
        raise SampleInputError(f"--controller: {exc}") from exc
    check_structure_fit(control, "--controller", metadata["signal"], args.model_config,
                        vae_factors(args.stand_in_vae, args.vae_config), (args.num_frames, args.height, args.width),
                        args.structure_video, "--structure-video", args.structure_model, args.structure_sketch_arch)


def check_structure_fit(control: Any, control_flag: str, kind: str, cfg: Any, factors: tuple[int, int],
                        shape: tuple[int, int, int], source: str, source_flag: str, structure_model: str | None,
                        sketch_arch: str | None) -> None:
    """A structure controller samples at `shape` (T, H, W): its folding must give the sampling VAE's latent, and
    a video `source` needs its signal's model here (a .safetensors source holds the signal computed)."""
    from megatron_video.control.signals import check_signal_source

    latent = latent_size(cfg, factors, *shape)[1:]
    if control.pixel_shape(latent) != tuple(shape):
        raise SampleInputError(f"the controller folds {control.temporal_downsample}x in time and "
                               f"{control.spatial_downsample}x in space ({control_flag}), the sampling VAE "
                               f"{factors[0]}x and {factors[1]}x")
    if not source.endswith(".safetensors"):
        try:
            check_signal_source(kind, structure_model, sketch_arch)
        except ValueError as exc:
            raise SampleInputError(f"{source_flag}: {exc}") from exc


def structure_signal(source: str, kind: str, shape: tuple[int, int, int], structure_model: str | None,
                     sketch_arch: str | None, device: torch.device, flag: str = "--structure-video") -> torch.Tensor:
    """The controller's input (1, 1, T, H, W) in [0, 1] from `source`: a video of `shape` (T, H, W), whose
    signal is extracted, or a .safetensors file holding the computed uint8 `structure` (1, T, H, W)."""
    from megatron_video.control.signals import from_levels, signal_extractor

    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        levels = load_file(source).get("structure")
        expected = (1, *shape)
        if levels is None or levels.dtype != torch.uint8 or tuple(levels.shape) != expected:
            raise SampleInputError(f"{flag} {source}: needs a uint8 `structure` tensor of shape {expected}")
        return from_levels(levels[None]).to(device)
    video = read_condition_video(source, *shape).to(device)
    extract = signal_extractor(kind, structure_model, sketch_arch)
    return from_levels(extract(video)).to(device)


def check_weights(args: argparse.Namespace, module: torch.nn.Module) -> None:
    """The weights' shapes against this model config, from metadata only (no tensor is read)."""
    cfg = module.cfg
    if args.released is not None:
        from checkpoints_convert.schema import SchemaError, check_schema
        from checkpoints_convert.sources import SourceError, open_released

        try:
            check_schema(open_released(args.released).shapes(), cfg, f"--released {args.released}")
        except (SchemaError, SourceError) as exc:
            raise SampleInputError(str(exc)) from exc
        return
    from megatron.core.dist_checkpointing import load_tensors_metadata

    from checkpoints_convert.ours import CheckpointFormatError, resolve_iteration
    from megatron_video.training.checkpointing import model_sharded_state_dict

    try:
        directory = resolve_iteration(args.load)
    except CheckpointFormatError as exc:
        raise SampleInputError(f"--load: {exc}") from exc
    stored = load_tensors_metadata(str(directory))
    wanted = model_sharded_state_dict(module, prefix=args.weights + ".")
    missing = [e.key for e in wanted.values() if e.key not in stored]
    mismatched = [f"{e.key}: {tuple(stored[e.key].global_shape)} != {tuple(e.global_shape)}"
                  for e in wanted.values() if e.key in stored and tuple(stored[e.key].global_shape) != e.global_shape]
    if missing or mismatched:
        raise SampleInputError(f"--load {args.load} ({args.weights} weights) is not a checkpoint of this model "
                               f"config: {len(missing)} missing, e.g. {missing[:3]}; {len(mismatched)} of another "
                               f"shape, e.g. {mismatched[:3]}")


def load_weights(args: argparse.Namespace, module: torch.nn.Module) -> None:
    if args.released is not None:
        load_released_weights(args.released, module)
        return
    from megatron_video.training.checkpointing import load_checkpoint, model_sharded_state_dict

    prefix = args.weights + "."
    _, loaded, _ = load_checkpoint(args.load, lambda: {"weights": model_sharded_state_dict(module, prefix=prefix)})
    module.load_state_dict(loaded["weights"], strict=True)


def load_released_weights(path: str, module: torch.nn.Module, flag: str = "--released") -> None:
    """Released-format weights (.safetensors, .pt or a diffusers folder) into the denoiser `module`, this TP rank's
    slices, every parameter set (SampleInputError otherwise)."""
    from megatron.core import parallel_state as mpu

    from checkpoints_convert.sources import open_released
    from megatron_video.models.suv_mmdit.state_dict_adapter import from_released_key, shard_released

    source = open_released(path)
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("._extra_state")}
    full = {}
    for key in source.keys():
        if key.endswith("._extra_state"):
            continue
        try:
            name = from_released_key(key, module.cfg)
        except KeyError:  # e.g. the last block's text modules, which this config does not build
            continue
        if name in own:
            full[key] = source.get(key)
    ours = {from_released_key(k, module.cfg): v for k, v in shard_released(
        full, mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()).items()}
    missing = sorted(set(own) - set(ours))
    if missing:
        raise SampleInputError(f"{flag} {path} lacks {missing[:4]}")
    result = module.load_state_dict({k: v.to(own[k].dtype) for k, v in ours.items()}, strict=False)
    if result.unexpected_keys or any(not k.endswith("._extra_state") for k in result.missing_keys):
        raise SampleInputError(f"{flag} {path} does not fit this model: {result}")


def text_encoder(kind: str, t5_path: str | None, clip_path: str | None, cfg: Any, device: torch.device) -> Any:
    """captions -> TextBatch, with T5 + CLIP ("osp") or the deterministic stand-in ("stub")."""
    from megatron_video.sampling.sampler import TextBatch

    if kind == "stub":
        from megatron_video.data.cache_builder import stub_encoders

        _, encode = stub_encoders(text_dim=cfg.caption_channels, pooled_dim=cfg.pooled_projection_dim)
    else:
        from megatron_video.models.text_encoders import TextEncoders

        encoders = TextEncoders.from_pretrained(t5_path, clip_path, dtype=torch.float32, device=device)

        def encode(captions: list[str]) -> tuple[torch.Tensor, ...]:
            return tuple(encoders.encode(captions))

    def run(captions: list[str]) -> TextBatch:
        hidden, mask, pooled = encode(list(captions))
        return TextBatch(hidden.float().to(device), mask.to(device), pooled.float().to(device))

    return run


def build_vae(stand_in: int | None, vae_path: str | None, vae_config: str | None, device: torch.device) -> Any:
    if stand_in is not None:
        from megatron_video.models.space_to_depth import SpaceToDepthVAE

        return SpaceToDepthVAE(stand_in)
    from megatron_video.models.wfvae import WFVAEConfig, load_wfvae

    config = WFVAEConfig.from_dict(json.loads(Path(vae_config).read_text())) if vae_config else None
    return load_wfvae(vae_path, config).to(device).eval()


def latent_size(cfg: Any, factors: tuple[int, int, int], num_frames: int, height: int, width: int,
                ) -> tuple[int, int, int, int]:
    temporal, spatial, _ = factors
    return cfg.in_channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial


def read_condition_video(path: str, num_frames: int, height: int, width: int) -> torch.Tensor:
    """(1, 3, T, H, W) in [-1, 1] from a video or image file of the sampling size (the last frame repeated)."""
    import numpy as np

    from megatron_video.sampling.video import read_mp4

    if Path(path).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        from PIL import Image

        frames = np.asarray(Image.open(path).convert("RGB"))[None]
    else:
        frames = read_mp4(path)
    if frames.shape[1:3] != (height, width):
        raise SampleInputError(f"--cond-video {path} is {frames.shape[2]}x{frames.shape[1]}, sampling "
                               f"{width}x{height}: resize it first")
    frames = frames[:num_frames]
    if len(frames) < num_frames:
        frames = np.concatenate([frames, np.repeat(frames[-1:], num_frames - len(frames), axis=0)])
    video = torch.from_numpy(frames).float().permute(3, 0, 1, 2) / 127.5 - 1.0
    return video[None]


def task_condition(task: str, video: torch.Tensor, vae: Any, latent_thw: tuple[int, int, int], masked_latents: str,
                   cond_frames: int = 1, chunk_size: int | None = None) -> Any:
    """The inpainting conditioning of `task` from `video` (1, 3, T, H, W) in [-1, 1], built by the model's
    `masked_latents` convention: the masked video through the VAE ("encode") or the video's latents masked."""
    from megatron_video.sampling.conditioning import inpaint_condition, task_frame_mask

    keep = task_frame_mask(task, video.shape[2], cond_frames)[None]
    if masked_latents == "encode":
        return inpaint_condition(keep, latent_thw, video=video, vae=vae, chunk_size=chunk_size)
    return inpaint_condition(keep, latent_thw, latents=vae.encode(video, chunk_size=chunk_size, sample=False))


def run(args: argparse.Namespace, prompts: list[str], negatives: list[str]) -> list[Path]:
    from megatron.core import parallel_state as mpu

    from megatron_video.parallel import init_distributed, initialize_parallel, set_seed
    from megatron_video.parallel.initialize import local_device
    from megatron_video.sampling.sampler import SamplerConfig, initial_noise, sample
    from megatron_video.sampling.video import to_frames, write_mp4
    from megatron_video.training.components import build_denoiser

    init_distributed(args.device, args.distributed_timeout_minutes, args.distributed_backend)
    initialize_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                        context_parallel_size=args.context_parallel_size)
    set_seed(args.seed)
    device = local_device()
    cfg = args.model_config
    module, _ = build_denoiser(args, cfg)
    module.to(device)
    check_weights(args, module)
    load_weights(args, module)
    structure = None
    if args.controller is not None:  # the base frozen under the exported structure controller
        from megatron_video.control.export import load_controller_weights, read_controller_file
        from megatron_video.models.control import ControlledSUV

        metadata, control, tensors = read_controller_file(args.controller)
        module = ControlledSUV(module, control).to(device)
        load_controller_weights(module.controller, tensors)
        structure = structure_signal(args.structure_video, metadata["signal"],
                                     (args.num_frames, args.height, args.width), args.structure_model,
                                     args.structure_sketch_arch, device)

    latent = latent_size(cfg, vae_factors(args.stand_in_vae, args.vae_config), args.num_frames, args.height,
                         args.width)
    encode_text = text_encoder(args.encoders, args.t5_path, args.clip_path, cfg, device)
    vae = build_vae(args.stand_in_vae, args.vae_path, args.vae_config, device)
    config = SamplerConfig(num_steps=args.num_steps, guidance_scale=args.guidance_scale)
    dp_rank, dp = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    writer = mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_context_parallel_rank() == 0 \
        and mpu.get_pipeline_model_parallel_rank() == 0
    condition = None
    if cfg.condition_channels:  # t2v through an inpainting model: nothing given, as trained
        if args.task == "t2v":
            video = torch.zeros(1, 3, args.num_frames, args.height, args.width)
        else:
            video = read_condition_video(args.cond_video, args.num_frames, args.height, args.width)
        condition = task_condition(args.task, video.to(device), vae, latent[1:], args.masked_latents,
                                   args.cond_frames)
    out = Path(args.out)
    written = []
    for index in range(dp_rank, len(prompts), dp):
        seed = args.seed + index
        negative = negatives[0] if len(negatives) == 1 else negatives[index]
        latents = sample(module, module, initial_noise(latent, [seed], device), encode_text([prompts[index]]),
                         config, negative=encode_text([negative]) if config.guidance_scale != 1.0 else None,
                         condition=condition, structure=structure)
        if writer:
            video = vae.decode(latents, chunk_size=args.vae_chunk_size)
            path = write_mp4(out / f"sample_{index:04d}.mp4", to_frames(video[0]), args.fps)
            from safetensors.torch import save_file

            save_file({"latents": latents.cpu().contiguous()}, str(out / f"sample_{index:04d}.latents.safetensors"))
            (out / f"sample_{index:04d}.json").write_text(json.dumps(
                {"prompt": prompts[index], "negative_prompt": negative, "seed": seed, "num_steps": args.num_steps,
                 "guidance_scale": args.guidance_scale, "task": args.task,
                 "weights": args.released or f"{args.load} ({args.weights})",
                 **({"controller": args.controller, "structure_video": args.structure_video}
                    if args.controller else {})}, indent=1))
            written.append(path)
            print(f"wrote {path} (seed {seed}): {prompts[index]}", flush=True)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_video.arguments import ArgumentError, parse_args
    from megatron_video.configfile import ConfigError
    from megatron_video.training.checkpointing import CheckpointError

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        args = parse_args(argv, extra_args=add_sample_args)
        prompts, negatives = check_inputs(args)
        run(args, prompts, negatives)
    except (ArgumentError, ConfigError, SampleInputError, CheckpointError) as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


__all__ = ["SampleInputError", "add_sample_args", "check_inputs", "load_released_weights", "main",
           "read_condition_video", "run", "task_condition"]
