"""Megatron-style command line, plus model and data config files, validated before anything heavy starts.

Flag names follow Megatron-LM where one exists, so launch scripts read the same. `parse_args` returns the
namespace with `model_config` / `data_config` attached as typed dataclasses; `validate_args` raises an
`ArgumentError` naming the offending value, and runs before any process group or model is built.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_video.configfile import ConfigError, from_mapping, read_mapping
from megatron_video.parallel.config import ParallelConfig, ParallelConfigError


class ArgumentError(ValueError):
    """An invalid command line or config; the message names the flag/key and value."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


class SuggestingParser(argparse.ArgumentParser):
    """An unknown flag is answered with the closest known ones ("did you mean ...")."""

    def error(self, message: str) -> None:  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            known = [o for action in self._actions for o in action.option_strings]
            hints = []
            for word in message[len(prefix):].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1) if word.startswith("-") else []
                if close:
                    hints.append(f"{word}: did you mean {' or '.join(close)}?")
            message = "; ".join([message, *hints])
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")  # the message alone, not the long usage


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        description="megatron-video training", allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("device and distributed")
    g.add_argument("--device", choices=("cuda", "npu", "cpu"), default=None,
                   help="default: cuda if available, else npu if torch_npu imports, else cpu")
    g.add_argument("--distributed-backend", choices=("nccl", "hccl", "gloo"), default=None,
                   help="default: the device's (nccl for cuda, hccl for npu, gloo for cpu)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="collective timeout; a dead rank makes the job fail within it")

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1,
                   help="tensor-parallel group size (attention heads and FFN split over it)")
    g.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1,
                   help="pipeline stages (the U-shaped block sequence split over them)")
    g.add_argument("--context-parallel-size", type=_positive_int, default=1,
                   help="context-parallel group size (the video token sequence split over it)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=_positive_int, default=None,
                   help="interleaved pipeline stages (not wired into the training loop yet: rejected)")
    g.add_argument("--pipeline-layer-split", type=str, default=None,
                   help="explicit blocks per pipeline stage, e.g. 8,8,8,8")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron sequence parallel inside the tensor-parallel group")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over the data-parallel group (ZeRO-1)")
    # Megatron-LM's data-parallel overlap flags (megatron/training/arguments.py), same names, defaults, meaning
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the DDP gradient reduce (per bucket) with the backward")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's parameter all-gather (per bucket) with the next forward")
    g.add_argument("--ddp-bucket-size", type=_positive_int, default=None,
                   help="parameters per DDP bucket (default with --overlap-grad-reduce: max(40M, 1M x DP); "
                        "without it one bucket)")

    g = parser.add_argument_group("model and data")
    g.add_argument("--model-config", type=str, default=None, help="JSON/YAML model config (may name a preset)")
    g.add_argument("--data-config", type=str, default=None, help="JSON/YAML data config")

    g = parser.add_argument_group("diffusion and encoders")
    g.add_argument("--objective", choices=("rectified_flow", "v_prediction"), default="rectified_flow",
                   help="diffusion training objective")
    g.add_argument("--vae-path", type=str, default=None, help="WF-VAE checkpoint (online encoding)")
    g.add_argument("--vae-config", type=str, default=None, help="WF-VAE config JSON (default: the released one)")
    g.add_argument("--vae-chunk-size", type=int, default=None, help="causal-cache tiling chunk (latent frames)")
    g.add_argument("--t5-path", type=str, default=None, help="local T5-v1.1 directory (HF layout)")
    g.add_argument("--clip-path", type=str, default=None, help="local CLIP text model directory (HF layout)")
    g.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak for MFU (H100 bf16 989, Ascend 910B fp16 ~313); 0 = not logged")

    g = parser.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=_positive_int, default=1, help="samples per device per micro-batch")
    g.add_argument("--global-batch-size", type=_positive_int, default=None,
                   help="default: micro batch x data-parallel size (no gradient accumulation)")
    g.add_argument("--train-iters", type=_positive_int, default=None, help="total iterations (global batches)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root"),
                   default="linear", help="as Megatron-LM (default linear, over --lr-decay-iters or --train-iters)")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="iterations of linear warm-up from 0")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="iterations of decay (default: --train-iters)")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (Megatron's default)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon (Megatron's default)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="fixed max grad norm (0 disables)")
    g.add_argument("--clip-grad-ema-decay", type=float, default=None,
                   help="adaptive EMA-3sigma clipping with this decay (v1.5 uses 0.99); replaces --clip-grad")
    g.add_argument("--clip-grad-ema-warmup-steps", type=int, default=10,
                   help="adaptive clipping: the first N steps seed the statistics (clipped, never extreme); "
                        "0 = the v1.5 first-step rule")
    g.add_argument("--clip-grad-rank-discard", action="store_true",
                   help="v1.3 per-rank discard: anomalous DP ranks drop their gradient (EMA of the max norm)")
    g.add_argument("--max-consecutive-extreme-steps", type=_positive_int, default=10,
                   help="stop with an error after this many extreme (skipped) steps in a row")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of the weights (0 disables)")

    g = parser.add_argument_group("precision and memory")
    precision = g.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (fp32 main weights)")
    precision.add_argument("--fp16", action="store_true", help="float16 mixed precision with loss scaling")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile (inductor) the SUV blocks' elementwise regions: norms with modulation, qk "
                        "norm with RoPE, gated residuals, GELU (not a Megatron-LM flag)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="activation recomputation: whole blocks (full) or parts of them (selective)")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="with full recomputation: which blocks are recomputed")
    g.add_argument("--recompute-num-layers", type=_positive_int, default=None,
                   help="with full recomputation: blocks per recomputed chunk (uniform) or per stage (block)")
    g.add_argument("--recompute-modules", nargs="+", choices=("core_attn", "mlp"), default=None,
                   help="with --recompute-granularity selective: core_attn (Megatron's default) and/or mlp (the FFN "
                        "half of every block, the Open-Sora Plan training fork's choice)")

    g = parser.add_argument_group("checkpointing and logging")
    g.add_argument("--seed", type=int, default=1234, help="random seed (weights, noise, data order)")
    g.add_argument("--save", type=str, default=None, help="checkpoint directory to write")
    g.add_argument("--load", type=str, default=None,
                   help="checkpoint directory to resume from (its latest checkpoint); the same directory as "
                        "--save may be empty: the first run then starts from scratch")
    g.add_argument("--overwrite-newer-checkpoints", action="store_true",
                   help="allow a run to publish checkpoints into a --save that holds newer ones than it starts "
                        "from (refused otherwise: it would replace newer work)")
    g.add_argument("--finetune", action="store_true",
                   help="load only the weights from --load and start at iteration 0 (e.g. imported released weights)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="load weights and counters from --load but not the optimizer / EMA / clip state")
    g.add_argument("--save-interval", type=_positive_int, default=None, help="iterations between checkpoints")
    g.add_argument("--keep-last-checkpoints", type=_positive_int, default=None,
                   help="delete all but this many newest checkpoints (default: keep all)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit once this many minutes of wall time have passed since the start")
    g.add_argument("--log-interval", type=_positive_int, default=100,
                   help="iterations per console line; its values are averaged over the interval (as Megatron-LM)")
    g.add_argument("--tensorboard-dir", type=str, default=None, help="TensorBoard event directory")

    g = parser.add_argument_group("evaluation and sampling")
    g.add_argument("--eval-interval", type=_positive_int, default=1000,
                   help="Megatron-LM: iterations between evaluations on the validation set (the data config's "
                        "`eval` section; no section, no evaluation); also evaluated after the last iteration")
    g.add_argument("--eval-iters", type=_positive_int, default=100,
                   help="Megatron-LM: global batches per evaluation (fewer if the held-out set is smaller)")
    g.add_argument("--eval-ema", action="store_true", help="evaluate (and sample) with the EMA weights")
    from megatron_video.sampling.training import add_training_sample_args

    add_training_sample_args(g)
    return parser


def _load_model_config(path: str) -> Any:
    from megatron_video.models.registry import model_config_from_mapping

    try:
        return model_config_from_mapping(read_mapping(path), source=path)
    except ConfigError as exc:
        raise ArgumentError(f"--model-config: {exc}") from exc


def _load_data_config(path: str) -> Any:
    from megatron_video.data.config import DataConfig

    try:
        config = from_mapping(DataConfig, read_mapping(path), source=path)
        config.validate()
    except (ConfigError, ValueError) as exc:
        raise ArgumentError(f"--data-config: {exc}") from exc
    return config


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        vpp = args.num_layers_per_virtual_pipeline_stage  # resolved to a stage count once the model is known
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=args.sequence_parallel,
    )


def validate_args(args: argparse.Namespace, world_size: int, num_heads: int | None = None) -> None:
    """Every check that needs no process group. Raises ArgumentError naming the offending value."""
    parallel = parallel_config(args)
    try:
        parallel.validate(world_size)
    except ParallelConfigError as exc:
        raise ArgumentError(str(exc)) from exc
    dp = world_size // parallel.model_parallel_size
    if num_heads is not None:
        split = args.tensor_model_parallel_size * args.context_parallel_size
        if num_heads % split != 0:
            raise ArgumentError(
                f"attention heads ({num_heads}) are not divisible by TP x CP = "
                f"{args.tensor_model_parallel_size} x {args.context_parallel_size} = {split}"
            )
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp} = {args.micro_batch_size * dp}"
        )
    if args.pipeline_layer_split is not None:
        try:
            split = [int(x) for x in args.pipeline_layer_split.split(",")]
        except ValueError as exc:
            raise ArgumentError(f"--pipeline-layer-split {args.pipeline_layer_split!r} is not a list of integers") \
                from exc
        if len(split) != args.pipeline_model_parallel_size or min(split) < 1:
            raise ArgumentError(
                f"--pipeline-layer-split {args.pipeline_layer_split!r} must give {args.pipeline_model_parallel_size}"
                " positive block counts (one per pipeline stage)"
            )
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        raise ArgumentError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    if args.clip_grad_rank_discard and args.overlap_grad_reduce:
        raise ArgumentError("--clip-grad-rank-discard tests each rank's gradient before the reduce, so it cannot "
                            "run with --overlap-grad-reduce")
    if args.clip_grad_rank_discard and args.clip_grad_ema_decay is not None:
        raise ArgumentError("--clip-grad-rank-discard and --clip-grad-ema-decay are alternatives; choose one")
    for flag in ("model_config", "data_config", "vae_path", "vae_config"):
        value = getattr(args, flag)
        if isinstance(value, str) and not Path(value).is_file():
            raise ArgumentError(f"--{flag.replace('_', '-')}: file not found: {value}")
    for flag in ("t5_path", "clip_path"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_dir():
            raise ArgumentError(f"--{flag.replace('_', '-')}: directory not found: {value}")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        raise ArgumentError("--num-layers-per-virtual-pipeline-stage: interleaved pipeline stages are not wired into "
                            "the training loop yet (the schedule is: megatron_video/parallel/pipeline.py)")
    if args.recompute_method is not None and args.recompute_granularity != "full":
        raise ArgumentError("--recompute-method needs --recompute-granularity full")
    if args.recompute_granularity == "full" and args.recompute_method is not None \
            and args.recompute_num_layers is None:
        raise ArgumentError("--recompute-method needs --recompute-num-layers")
    if args.recompute_method == "uniform" and args.recompute_num_layers != 1:
        raise ArgumentError(f"--recompute-method uniform --recompute-num-layers {args.recompute_num_layers}: this "
                            "model recomputes one block at a time (long skips leave any larger unit); use 1, or "
                            "--recompute-method block to recompute the first N blocks of each pipeline stage")
    if args.recompute_modules is not None and args.recompute_granularity != "selective":
        raise ArgumentError("--recompute-modules needs --recompute-granularity selective")
    validate_hyperparameters(args)
    if args.clip_grad < 0:
        raise ArgumentError(f"--clip-grad must be >= 0, got {args.clip_grad}")
    if args.clip_grad_ema_decay is not None and not 0.0 < args.clip_grad_ema_decay < 1.0:
        raise ArgumentError(f"--clip-grad-ema-decay must be in (0, 1), got {args.clip_grad_ema_decay}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ArgumentError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        raise ArgumentError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save")


def validate_hyperparameters(args: argparse.Namespace) -> None:
    """Every float flag finite (argparse's float() takes "nan" and "inf": `--lr inf` trained NaN to exit code
    0), and the optimizer's ranges, so a bad value stops before any process group is built."""
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise ArgumentError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.lr <= 0 or args.min_lr < 0:
        raise ArgumentError(f"need --lr > 0 and --min-lr >= 0, got --lr {args.lr} --min-lr {args.min_lr}")
    if args.weight_decay < 0 or args.adam_eps <= 0:
        raise ArgumentError(f"need --weight-decay >= 0 and --adam-eps > 0, got {args.weight_decay}, {args.adam_eps}")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be in [0, 1), got {getattr(args, flag)}")
    for flag in ("lr_warmup_iters", "clip_grad_ema_warmup_steps"):
        if getattr(args, flag) < 0:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.lr_decay_iters is not None and args.lr_decay_iters <= 0:
        raise ArgumentError(f"--lr-decay-iters must be > 0, got {args.lr_decay_iters}")
    decay = args.lr_decay_iters or args.train_iters
    if decay is not None and args.lr_warmup_iters >= decay:  # megatron's scheduler warms up inside the decay
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be less than the learning-rate decay "
                            f"length, {decay} iterations (--lr-decay-iters, default --train-iters)")
    if args.distributed_timeout_minutes <= 0 or args.peak_tflops < 0:
        raise ArgumentError("need --distributed-timeout-minutes > 0 and --peak-tflops >= 0")


def parse_args(
    argv: Sequence[str] | None = None,
    world_size: int | None = None,
    extra_args: Any = None,
) -> argparse.Namespace:
    """Parse, load the config files into dataclasses, validate. `extra_args(parser)` adds entry-point flags."""
    parser = build_parser()
    if extra_args is not None:
        extra_args(parser)
    args, extras = parser.parse_known_args(argv)
    from megatron_video.adaptor.startup import unknown_flags

    args.mindspeed_flags, rejected = unknown_flags(extras, args.device)  # read by MindSpeed from sys.argv
    if rejected:
        parser.error(f"unrecognized arguments: {' '.join(rejected)}")
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    # paths first, so a missing file is named before its contents are parsed
    validate_args(args, world_size)
    args.model_config = _load_model_config(args.model_config) if args.model_config else None
    args.data_config = _load_data_config(args.data_config) if args.data_config else None
    heads = getattr(args.model_config, "num_heads", None)
    if heads is not None:
        validate_args(args, world_size, num_heads=heads)
        validate_model_parallel(args)
    if args.sample_interval is not None and args.data_config is not None and heads is not None:
        from megatron_video.sampling.training import SampleInputError, check_sample_args

        try:
            check_sample_args(args)
        except SampleInputError as exc:
            raise ArgumentError(str(exc)) from exc
    return args


def validate_model_parallel(args: argparse.Namespace) -> None:
    """Checks that need the model config: the context-parallel plan of every block, the pipeline split."""
    from megatron_video.models.suv_mmdit.context_parallel import validate_context_parallel

    cfg = args.model_config
    if args.context_parallel_size > 1:
        try:
            validate_context_parallel(cfg, args.context_parallel_size, args.tensor_model_parallel_size)
        except ValueError as exc:
            raise ArgumentError(f"--context-parallel-size {args.context_parallel_size}: {exc}") from exc
    pp = args.pipeline_model_parallel_size
    if args.recompute_num_layers is not None and args.recompute_num_layers > cfg.num_blocks:
        raise ArgumentError(f"--recompute-num-layers {args.recompute_num_layers} exceeds the model's "
                            f"{cfg.num_blocks} blocks")
    if pp > cfg.num_blocks:
        raise ArgumentError(f"--pipeline-model-parallel-size {pp} exceeds the model's {cfg.num_blocks} blocks")
    if args.pipeline_layer_split is not None:
        total = sum(int(x) for x in args.pipeline_layer_split.split(","))
        if total != cfg.num_blocks:
            raise ArgumentError(f"--pipeline-layer-split {args.pipeline_layer_split} covers {total} blocks, the model "
                                f"has {cfg.num_blocks}")
