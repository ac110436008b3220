"""The evaluation loss inside the training loop: the held-out data (the data config's `eval` section), Megatron's
--eval-interval / --eval-iters, EMA weights on request, logging per bucket."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_video.data.config import DataConfig, EvalDataConfig
from megatron_video.evaluation.eval_loss import EvalBatch, EvalResult, bucket_name, evaluate_batches


def eval_data_config(config: DataConfig) -> DataConfig:
    """The training data config with the held-out set's sources; captions are never dropped."""
    held_out = config.eval
    return dataclasses.replace(
        config, metadata_paths=list(held_out.metadata_paths), data_root=held_out.data_root,
        cache_path=held_out.cache_path, caption=dataclasses.replace(config.caption, cfg_dropout=0.0),
        eval=EvalDataConfig(), num_workers=0)


@contextlib.contextmanager
def ema_weights(module: torch.nn.Module, ema: Any) -> Iterator[None]:
    """The module computes with the EMA weights inside the block (collective over DP: the EMA is sharded)."""
    full = ema.full_state_dict()
    params = dict(module.named_parameters())
    saved = {name: params[name].detach().clone() for name in full}
    with torch.no_grad():
        for name, value in full.items():
            params[name].copy_(value.to(params[name].dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@contextlib.contextmanager
def evaluation_weights(parts: Any, use_ema: bool) -> Iterator[None]:
    """The weights an evaluation or a sample computes with: the EMA's inside the block if `use_ema`, else the
    model's. Either way the parameter all-gather of --overlap-param-gather is finished first, as Megatron-LM does
    before its evaluation: after a step the model holds only this rank's shard of the new weights until the next
    forward gathers the rest, so the EMA swap would save (and put back) a stale copy, and megatron, whose gather
    ran during the evaluation, would not gather again before the next training forward."""
    parts.sync_params()
    with ema_weights(parts.module, parts.ema) if use_ema else contextlib.nullcontext():
        yield


class Evaluator:
    """Runs the evaluation loss every `--eval-interval` iterations and after the last one (as Megatron-LM)."""

    def __init__(self, args: argparse.Namespace, dp_rank: int, dp_size: int, objective: Any,
                 prepare_inputs: Callable, condition: Callable | None = None) -> None:
        from megatron_video.data.cache import FeatureCacheDataset
        from megatron_video.data.dataset import VideoDataset

        self.args, self.objective, self.prepare_inputs, self.condition = args, objective, prepare_inputs, condition
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.held_out = args.data_config.eval
        config = eval_data_config(args.data_config)
        self.config = config
        self.dataset = FeatureCacheDataset(config.cache_path, config) if config.cache_path \
            else VideoDataset.from_config(config)

    def due(self, iteration: int, last: bool) -> bool:
        interval = self.args.eval_interval
        return last or bool(interval and iteration % interval == 0)

    def batches(self, encode: Callable) -> Iterator[EvalBatch]:
        """The first --eval-iters global batches of the fixed evaluation order (fewer if the set is smaller)."""
        from megatron_video.data.loader import build_dataloader
        from megatron_video.data.sampler import ShapeBatchSampler
        from megatron_video.training.data import trim_text_padding
        from megatron_video.training.loop import global_positions

        args = self.args
        sampler = ShapeBatchSampler(self.dataset.shape_keys, global_batch_size=args.global_batch_size,
                                    micro_batch_size=args.micro_batch_size, dp_rank=self.dp_rank,
                                    dp_size=self.dp_size, seed=self.held_out.seed, drop_last=False)
        num_micro = sampler.micro_batches_per_global
        loader = iter(build_dataloader(self.dataset, sampler, num_workers=0))
        total = len(sampler) // num_micro
        for index in range(min(args.eval_iters, total)):
            micro_batches = []
            shape = None
            for m in range(num_micro):
                raw = next(loader)
                shape = raw["shape"]
                mb = encode(raw)
                mb["positions"] = [index * args.global_batch_size + p
                                   for p in global_positions(m, args.micro_batch_size, self.dp_rank, self.dp_size)]
                if self.condition is not None:  # the inpainting masks of position p at "iteration 0": fixed
                    self.condition(mb, 0, 0)
                micro_batches.append(mb)
            trim_text_padding(micro_batches)
            yield EvalBatch(bucket_name(shape), micro_batches)

    def run(self, parts: Any, encode: Callable) -> EvalResult:
        use_ema = self.args.eval_ema and parts.ema is not None
        with evaluation_weights(parts, use_ema):
            return evaluate_batches(parts.model, parts.module, self.objective, self.batches(encode),
                                    self.prepare_inputs, self.args.micro_batch_size, self.held_out.num_timesteps,
                                    self.held_out.seed)


def maybe_evaluate(evaluator: Evaluator | None, parts: Any, encode: Callable, iteration: int, last: bool,
                   log: Any) -> EvalResult | None:
    """The loop's hook: evaluate when due, print one line, write the scalars to TensorBoard."""
    if evaluator is None or not evaluator.due(iteration, last):
        return None
    result = evaluator.run(parts, encode)
    weights = "EMA" if evaluator.args.eval_ema and parts.ema is not None else "model"
    buckets = " | ".join(f"{name} {value:.4f}" for name, value in result.per_bucket.items())
    log.info("evaluation at iteration %d (%s weights, %d samples) | eval loss %.4f | %s", iteration, weights,
             sum(result.samples.values()), result.overall, buckets)
    if log.writer is not None:
        for name, value in result.scalars().items():
            log.writer.add_scalar(name, value, iteration)
        log.writer.flush()
    return result


def build_evaluator(args: argparse.Namespace, dp_rank: int, dp_size: int, objective: Any, prepare_inputs: Callable,
                    condition: Callable | None) -> Evaluator | None:
    """None unless the data config has an `eval` section."""
    if not args.data_config.eval.enabled:
        return None
    return Evaluator(args, dp_rank, dp_size, objective, prepare_inputs, condition)




class TrainingHooks:
    """What the training loop calls after each step: the evaluation loss and the sample videos when due."""

    def __init__(self, evaluator: Evaluator | None, sampler: Any) -> None:
        self.evaluator, self.sampler = evaluator, sampler

    def after_step(self, parts: Any, encode: Callable, iteration: int, last: bool, log: Any) -> None:
        maybe_evaluate(self.evaluator, parts, encode, iteration, last, log)
        if self.sampler is not None and self.sampler.due(iteration):
            self.sampler.run(parts, iteration, log)


def build_hooks(args: argparse.Namespace, dp_rank: int, dp_size: int, objective: Any, prepare_inputs: Callable,
                condition: Callable | None, device: torch.device) -> TrainingHooks:
    sampler = None
    if args.sample_interval is not None:
        from megatron_video.sampling.training import TrainingSampler

        sampler = TrainingSampler(args, device)
    return TrainingHooks(build_evaluator(args, dp_rank, dp_size, objective, prepare_inputs, condition), sampler)


__all__ = ["Evaluator", "TrainingHooks", "build_evaluator", "build_hooks", "ema_weights", "eval_data_config",
           "evaluation_weights", "maybe_evaluate"]
