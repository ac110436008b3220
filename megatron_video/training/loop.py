"""The training loop shared by pretrain_t2v.py and pretrain_i2v.py.

One iteration: pull `num_microbatches` micro-batches of this data-parallel rank (one shape per global batch),
encode them (or read the feature cache), run megatron-core's forward-backward schedule, let the clipping
optimizer decide (clip / step / skip an extreme step), update the EMA, the LR, the counters, log, and save
when due or when the job is being preempted (SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_video.data.sampler import EmptyEpochError
from megatron_video.optim.clip import TooManyExtremeStepsError
from megatron_video.optim.extreme_log import ExtremeStepLog, gather_sample_ids
from megatron_video.training.checkpointing import (
    CheckpointError,
    CheckpointSaveError,
    load_checkpoint,
    save_checkpoint,
)
from megatron_video.training.save_dir import resume_iteration, write_model_config

EXTREME_LOG = "extreme_batches.jsonl"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    extreme: ExtremeStepLog = field(default_factory=ExtremeStepLog)
    sampler_position: tuple[int, int] | None = None  # (epoch, consumed) after the last micro-batch trained on

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "extreme": self.extreme.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration, self.consumed_samples = int(state["iteration"]), int(state["consumed_samples"])
        if "extreme" in state:
            self.extreme.load_state_dict(state["extreme"])


class Preemption:
    """SIGTERM (a scheduler preempting the job) or SIGUSR1 (Slurm's `--signal` warning before the time limit)
    asks the loop to save and exit cleanly at the next step end; so does `--exit-duration-in-mins` (Megatron's
    meaning: minutes of wall time since the start)."""

    def __init__(self, exit_duration_mins: float | None = None, started: float | None = None) -> None:
        self.reason: str | None = None
        started = time.monotonic() if started is None else started
        self._deadline = None if exit_duration_mins is None else started + 60.0 * exit_duration_mins
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def _handle(self, signum: int, frame: Any) -> None:
        self.reason = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank got the signal or passed the deadline."""
        if self.reason is None and self._deadline is not None and time.monotonic() >= self._deadline:
            self.reason = "--exit-duration-in-mins"
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.reason is None:
            self.reason = "another rank's signal"
        return bool(flag.item() > 0)


def _forever(loader: Any) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


def _all_finite(value: float, device: torch.device) -> bool:
    """True on every rank iff `value` is finite on every rank."""
    flag = torch.tensor([1.0 if math.isfinite(value) else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _newest_checkpoint(save_dir: str | None) -> str:
    from megatron_video.training.checkpointing import iteration_dir, latest_iteration

    last = latest_iteration(save_dir) if save_dir and Path(save_dir).is_dir() else None
    return "none" if last is None else str(iteration_dir(save_dir, last))


def _mean_over(value: float, group: Any, device: torch.device) -> float:
    # float32: MindSpeed reduces a float64 tensor as a float32 copy and never writes back into the caller's
    # tensor (mindspeed/core/megatron_basic/requirements_basic.py, core_r0.16.0), so a float64 sum stays local
    tensor = torch.tensor([value], dtype=torch.float32, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.item() / dist.get_world_size(group)


def make_forward_step(
    objective: Any, prepare_inputs: Callable[[dict[str, Any], Any], dict[str, torch.Tensor]], base_seed: int,
    iteration: int,
) -> Callable:
    """The schedule's forward step. Each sample's noise and sigma come from a generator keyed by (seed,
    iteration, its position in the global batch): identical on TP/CP/PP peers, independent of the DP size and
    micro-batch split, reproducible on resume."""
    from megatron_video.diffusion.base import sample_each
    from megatron_video.diffusion.seeding import sample_generators

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
        batch = next(data_iterator)
        x0 = batch["x0"]
        sample = sample_each(objective, x0, sample_generators(base_seed, iteration, batch["positions"], x0.device))
        inputs = prepare_inputs(batch, sample)
        valid = inputs.pop("loss_mask")
        output = model(**inputs)

        def loss_func(prediction: torch.Tensor):
            loss = objective.loss(prediction, sample.target, valid, sample.weight)
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    return forward_step


def global_positions(micro_index: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[int]:
    """Positions in the global batch of the samples of this rank's `micro_index`-th micro-batch (the sampler
    hands out micro-batch m of DP rank r at offset (m * dp_size + r) * micro_batch_size)."""
    start = (micro_index * dp_size + dp_rank) * micro_batch_size
    return list(range(start, start + micro_batch_size))


def t2v_inputs(batch: dict[str, torch.Tensor], sample: Any) -> dict[str, torch.Tensor]:
    """Denoiser keyword arguments for text-to-video, plus the loss mask (valid latent positions)."""
    x_t = sample.x_t
    b, _, t, h, w = x_t.shape
    valid = torch.ones(b, t, h, w, dtype=torch.bool, device=x_t.device)  # one shape per batch: all valid
    # masks of None tell the model every token is valid (known here on the host), so attention needs no mask
    text_mask = None if batch.get("t5_all_valid") else batch["t5_mask"][:, None]
    return {
        "hidden_states": x_t, "timestep": sample.timestep, "encoder_hidden_states": batch["t5_hidden"][:, None],
        "pooled_projections": batch["clip_pooled"][:, None], "attention_mask": None,
        "encoder_attention_mask": text_mask, "loss_mask": valid,
    }


def _record_extreme(save_dir: str | None, state: TrainState, sample_ids: list[int], record: Any,
                    dp_group: Any, sampler: Any) -> None:
    ids = gather_sample_ids(sample_ids, dp_group)
    epoch = state.sampler_position[0] if state.sampler_position is not None else sampler.epoch
    state.extreme.record(state.iteration, ids, record.grad_norm_before, epoch=epoch)
    # from the next epoch on, in this run as in any run resumed from a later checkpoint (exact resume)
    sampler.add_skip_ids(ids, from_epoch=epoch + 1)
    if save_dir and dist.get_rank() == 0:
        # written at once, so a run resumed from an older checkpoint skips this batch too
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(save_dir) / EXTREME_LOG, "a") as handle:
            handle.write(json.dumps(state.extreme.entries[-1]) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _extreme_entries_on_disk(root: str | None) -> list[dict[str, Any]]:
    path = Path(root) / EXTREME_LOG if root else None
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resume(args: argparse.Namespace, parts: Any, data: Any, state: TrainState, log: Any) -> None:
    """Load `--load`: everything for an exact resume, or only the weights with --finetune / --no-load-optim."""
    from megatron_video.optim.builder import use_fast_host_kernels
    from megatron_video.training.checkpoint_state import check_optimizer_kind, load_optimizer_state
    from megatron_video.training.components import materialize_optimizer_state

    weights_only = args.finetune or args.no_load_optim
    materialize_optimizer_state(parts.optimizer)

    def build() -> dict[str, Any]:
        return checkpoint_sharded_state(parts, loading=True, weights_only=weights_only)

    check = None if weights_only else check_optimizer_kind(parts.optimizer)
    iteration, loaded, common = load_checkpoint(args.load, build, check_saved=check)
    parts.module.load_state_dict(loaded["model"], strict=parts.frozen_prefix is None)  # a frozen base: not saved
    if not weights_only:
        load_optimizer_state(parts.optimizer, loaded["optimizer"], parts.checkpointed_state())
        use_fast_host_kernels(parts.optimizer.optimizer)  # loading restored the saved param-group options
        if parts.ema is not None:
            # a rank whose optimizer range holds no parameter has no EMA entry (dist_checkpointing drops the
            # empty dict); load_sharded_state_dict still insists on every range the rank does hold
            parts.ema.load_sharded_state_dict(loaded.get("ema", {}))
            parts.ema.num_updates = int(common["ema_updates"])
        parts.optimizer.load_clip_state_dict(common["clip"])
        parts.scheduler.load_state_dict(common["scheduler"])
        if parts.rank_discard is not None and common.get("rank_discard"):
            parts.rank_discard.load_state_dict(common["rank_discard"])
    elif parts.ema is not None:
        parts.ema.load_full_state_dict({name: param.detach().float() for name, param in
                                        parts.module.named_parameters()})
    # the main params of the distributed optimizer start from the loaded weights
    if weights_only:
        parts.optimizer.reload_model_params()
    if not args.finetune:
        state.load_state_dict(common["train"])
        data.sampler.load_state_dict(common["sampler"])
    log.info("loaded %s iteration %d (%s); continuing at iteration %d", args.load, iteration,
             "weights only" if weights_only else "full state", state.iteration)


def checkpoint_sharded_state(parts: Any, loading: bool, weights_only: bool = False) -> dict[str, Any]:
    from megatron_video.training.checkpoint_state import optimizer_sharded_state

    model_sd = parts.checkpointed_state()
    out: dict[str, Any] = {"model": model_sd}
    if weights_only:
        return out
    out["optimizer"] = optimizer_sharded_state(parts.optimizer, model_sd, loading)
    if parts.ema is not None:  # checkpoint keys "ema.<param name>", beside the model's "model.<param name>"
        plain = parts.checkpointed_state(prefix="")
        ema = parts.ema.sharded_state_dict(plain, prefix="ema.")
        # frozen parameters (no optimizer state, never updated) are their own EMA: store them too, so the EMA
        # weights are a complete state dict for export
        tracked = parts.ema.param_names()
        for name, entry in plain.items():
            if name not in tracked:
                ema[name] = dataclasses.replace(entry, key="ema." + name)
        out["ema"] = ema
    return out


def pretrain(argv: Sequence[str] | None = None, prepare_inputs: Callable = t2v_inputs,
             extra_args: Callable | None = None, setup: Callable | None = None, wrap: Callable | None = None) -> int:
    """`setup(args, components, encoder)`, if given, runs once before resuming (e.g. to initialise weights) and
    may return `condition(micro_batch, iteration, consumed_samples)`, applied to every encoded micro-batch
    once its "positions" are set (pretrain_i2v.py adds the inpainting masks and conditioning this way).
    `wrap(args, denoiser) -> ModelWrap` (training/components.py), if given, changes the trained module before DDP
    and the optimizer are built (pretrain_control.py: a controller around a frozen base)."""
    from megatron_video.adaptor.startup import setup_device_from_argv

    setup_device_from_argv(argv)  # before megatron is imported (MindSpeed patches it on import); idempotent
    run_started = time.monotonic()  # --exit-duration-in-mins counts from here (Megatron: from its pretrain())
    from megatron.core import parallel_state as mpu

    from megatron_video.arguments import parse_args
    from megatron_video.diffusion import build_objective
    from megatron_video.parallel import init_distributed, initialize_parallel, set_seed
    from megatron_video.parallel.initialize import local_device
    from megatron_video.parallel.pipeline import (
        batch_pipeline_shapes,
        from_last_stage,
        run_forward_backward,
        sum_over_pipeline,
    )
    from megatron_video.training.components import build_components
    from megatron_video.training.data import BatchEncoder, build_data, trim_text_padding
    from megatron_video.training.flops import training_flops_per_sample, video_tokens
    from megatron_video.training.logger import TrainLogger

    args = parse_args(argv, extra_args=extra_args)
    if args.model_config is None or args.data_config is None or args.train_iters is None:
        raise SystemExit("training needs --model-config, --data-config and --train-iters")
    backend = init_distributed(args.device, args.distributed_timeout_minutes, args.distributed_backend)
    initialize_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                        context_parallel_size=args.context_parallel_size)
    set_seed(args.seed)
    device = local_device()
    dp_group = mpu.get_data_parallel_group()
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    num_micro = args.global_batch_size // (args.micro_batch_size * dp_size)

    parts = build_components(args, args.model_config, args.train_iters, wrap)
    data = build_data(args, args.data_config, dp_rank, dp_size)
    encode = BatchEncoder(args, device)
    objective = build_objective(args.objective)
    state = TrainState()
    log = TrainLogger(args.train_iters, args.tensorboard_dir, args.log_interval, args.global_batch_size, args)
    preemption = Preemption(args.exit_duration_in_mins, run_started)

    def save(iteration: int) -> None:
        common = {
            "train": state.state_dict(), "world_size": dist.get_world_size(),
            "clip": parts.optimizer.clip_state_dict(), "scheduler": parts.scheduler.state_dict(),
            "sampler": data.sampler.state_dict(position=state.sampler_position),
            "rank_discard": parts.rank_discard.state_dict() if parts.rank_discard is not None else None,
            "ema_updates": parts.ema.num_updates if parts.ema is not None else 0, **parts.common,
        }
        started = time.monotonic()
        parts.sync_params()  # the weights the checkpoint reads, not the ones the next forward would gather
        try:
            path = save_checkpoint(args.save, iteration, checkpoint_sharded_state(parts, loading=False), common,
                                   args.keep_last_checkpoints, args.overwrite_newer_checkpoints)
        except CheckpointSaveError as exc:  # rank 0 says why (and any rank that ran out of space)
            if dist.get_rank() == 0 or exc.out_of_space:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if dist.get_rank() == 0:  # read by the next run's preflight, before it builds anything
            write_model_config(path, args.model_config)
        log.info("saved checkpoint %s in %.1f s", path, time.monotonic() - started)

    from megatron_video.evaluation.runner import build_hooks

    try:
        condition = setup(args, parts, encode) if setup is not None else None
        hooks = build_hooks(args, dp_rank, dp_size, objective, prepare_inputs, condition, device)  # eval, samples
        if args.load and resume_iteration(args.load) is None:  # --load = --save on a job's first run (preflight.py)
            log.info("no checkpoint in --load %s yet: starting from scratch", args.load)
        elif args.load:
            resume(args, parts, data, state, log)
    except CheckpointError as exc:  # every rank reads the same checkpoint and fails alike: one says why
        if dist.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    # extreme batches recorded by any earlier run of this job, even after the checkpoint it resumes from, are
    # skipped from the epoch after theirs (an entry without an epoch: from the next epoch that starts)
    for entry in [*state.extreme.entries, *_extreme_entries_on_disk(args.load), *_extreme_entries_on_disk(args.save)]:
        data.sampler.add_skip_ids(entry["sample_ids"], from_epoch=int(entry.get("epoch", -1)) + 1)

    batches = _forever(data.loader)
    # the whole model's parameter count: TP-sharded parameters x TP, summed over pipeline stages
    tp = args.tensor_model_parallel_size
    sizes = [(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1), p.requires_grad)
             for p in parts.module.parameters()]
    num_params = sum_over_pipeline(sum(n for n, _ in sizes), device)
    frozen_params = sum_over_pipeline(sum(n for n, trains in sizes if not trains), device)  # a frozen base
    blocks_k = parts.module.attention_sparsity()
    save_wanted = False
    while state.iteration < args.train_iters:
        started = time.monotonic()
        try:
            micro_batches = [encode(next(batches)) for _ in range(num_micro)]
        except EmptyEpochError as exc:  # the same on every rank (same sampler state)
            log.info("stopping at iteration %d: %s. The extreme-batch logs read: %s", state.iteration, exc,
                     ", ".join(str(Path(d) / EXTREME_LOG) for d in (args.load, args.save) if d) or "none")
            log.close()
            return 1
        trim_text_padding(micro_batches)
        for index, micro_batch in enumerate(micro_batches):
            micro_batch["positions"] = global_positions(index, args.micro_batch_size, dp_rank, dp_size)
            if condition is not None:
                condition(micro_batch, state.iteration, state.consumed_samples)
        sample_ids = [int(i) for mb in micro_batches for i in mb["sample_id"]]
        state.sampler_position = micro_batches[-1]["sampler_position"]
        forward_step = make_forward_step(objective, prepare_inputs, args.seed, state.iteration)
        parts.model.zero_grad_buffer()
        parts.optimizer.zero_grad()
        x0 = micro_batches[0]["x0"]
        recv_shape, send_shape = batch_pipeline_shapes(parts.module, micro_batches)
        losses = run_forward_backward(forward_step, iter(micro_batches), parts.model, num_micro,
                                      args.micro_batch_size, recv_shape, send_shape)
        loss = _mean_over(sum(d["loss"].item() for d in losses) / max(len(losses), 1), dp_group, device)
        loss = from_last_stage(loss, device)  # only the last pipeline stage computes the loss
        loss_finite = _all_finite(loss, device)
        try:
            record = parts.optimizer.step(loss_finite=loss_finite)
        except TooManyExtremeStepsError as exc:  # every rank took the same decision: stop them all cleanly
            log.info("stopping at iteration %d: %s The newest checkpoint (never one after a non-finite step) "
                     "is %s.", state.iteration + 1, exc, _newest_checkpoint(args.save))
            log.close()
            return 1
        state.iteration += 1
        state.consumed_samples += args.global_batch_size
        if record.extreme:
            _record_extreme(args.save, state, sample_ids, record, dp_group, data.sampler)
        if record.stepped:
            if parts.ema is not None:
                parts.ema.update()
            parts.scheduler.step(increment=1)
        elapsed = time.monotonic() - started
        tokens = video_tokens(x0.shape[2:], args.model_config.patch_size)
        flops = training_flops_per_sample(num_params, args.model_config.hidden_size, blocks_k, tokens,
                                          micro_batches[0]["t5_hidden"].shape[1], frozen_params)
        world = dist.get_world_size()
        scalars = {
            "loss": loss, "grad_norm": record.grad_norm_before, "grad_norm_clipped": record.grad_norm_after,
            "clip_threshold": record.threshold, "clip_mu": record.mu, "clip_var": record.var,
            "clipped": float(record.clipped), "skipped": float(record.skipped),
            "lr": parts.optimizer.param_groups[0]["lr"], "samples_per_s": args.global_batch_size / elapsed,
            "video_tokens_per_s": args.global_batch_size * tokens / elapsed,
            "tflops_per_device": flops * args.global_batch_size / elapsed / world / 1e12,
            "bad_samples": float(data.dataset.bad_sample_count()),
            "skipped_batches": float(data.sampler.skipped_batches),
            "mem_gib": backend.max_memory_allocated() / 2**30,
        }
        if args.peak_tflops:  # MFU only when the peak is known (no column otherwise)
            scalars["mfu"] = 100.0 * scalars["tflops_per_device"] / args.peak_tflops
        scalars["iteration_ms"], scalars["consumed_samples"] = 1000.0 * elapsed, float(state.consumed_samples)
        log.log(state.iteration, scalars, extra="EXTREME step skipped" if record.extreme else "")
        due = args.save and args.save_interval and state.iteration % args.save_interval == 0
        hooks.after_step(parts, encode, state.iteration, state.iteration == args.train_iters, log)
        preempted = preemption.agreed(device)
        # a non-finite step postpones a due save to the next finite step, so the newest checkpoint (the one
        # --keep-last-checkpoints keeps) never follows a non-finite loss / grad norm
        non_finite = not loss_finite or (not record.overflow and not math.isfinite(record.grad_norm_before))
        save_wanted = save_wanted or bool(args.save and (due or preempted or state.iteration == args.train_iters))
        if save_wanted and non_finite:
            log.info("iteration %d: non-finite loss or grad norm, checkpoint postponed to the next finite step",
                     state.iteration)
        elif save_wanted:
            save(state.iteration)
            save_wanted = False
        if preempted:
            log.info("%s: %s at iteration %d, exiting", preemption.reason, "saved" if args.save and not save_wanted else
                     "not saved", state.iteration)
            break
    if save_wanted:
        log.info("the last step was non-finite: no checkpoint saved after it; the newest is %s",
                 _newest_checkpoint(args.save))
    log.close()
    return 0
