"""Evaluation loss as the Open-Sora 1.3 report tracks it: on a held-out set, per shape bucket, at fixed
equidistant timesteps with fixed noise.

Every held-out sample is noised at the `n` levels i / (n + 1), i = 1..n (equidistant, both ends left out, and
without the training shift: the same σ for every resolution, so buckets compare), always with the same noise,
drawn from a generator keyed by (eval seed, the sample's position in the fixed evaluation order). The loss of a
sample at a level is the objective's squared error averaged over its valid latent positions. Results: the mean
per bucket (over samples and levels), per level, and overall (over every sample and level).

Parallel layouts: the noise depends on the position only, every TP / CP / PP peer sees the same micro-batch,
DP ranks evaluate disjoint slices of each global batch; per-sample losses are summed in float64 over DP and
sent from the last pipeline stage, so every layout gives the one-rank number up to the fp32 round-off of the
model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_video.diffusion.base import Objective, masked_mse_sum
from megatron_video.diffusion.seeding import make_generator, noise_seed

EVAL_STREAM = 2  # the `dp_rank` slot of noise_seed: training noise uses 0, inpainting masks 1


def eval_levels(num_timesteps: int) -> list[float]:
    """The noise levels i / (n + 1), i = 1..n."""
    if num_timesteps < 1:
        raise ValueError(f"need at least one evaluation timestep, got {num_timesteps}")
    return [i / (num_timesteps + 1) for i in range(1, num_timesteps + 1)]


def eval_noise(x0: torch.Tensor, positions: list[int], seed: int) -> torch.Tensor:
    """Fixed noise for the samples at these positions of the evaluation order (same for every level)."""
    return torch.cat([
        torch.randn(x0.shape[1:], generator=make_generator(noise_seed(seed, 0, int(p), EVAL_STREAM)),
                    dtype=torch.float32).unsqueeze(0)
        for p in positions]).to(x0.device)


def bucket_name(shape: tuple[int, int, int]) -> str:
    """"image_HxW" for single frames, "TxHxW" for videos (pixel space, as the data set's buckets)."""
    t, h, w = (int(v) for v in shape)
    return f"image_{h}x{w}" if t == 1 else f"{t}x{h}x{w}"


@dataclass(frozen=True)
class EvalBatch:
    """One global batch of the held-out set (one bucket): this DP rank's encoded micro-batches, each with its
    "positions" in the evaluation order."""

    bucket: str
    micro_batches: list[dict[str, Any]]


@dataclass
class EvalResult:
    per_bucket: dict[str, float]
    per_level: list[float]
    overall: float
    samples: dict[str, int]

    def scalars(self, prefix: str = "eval") -> dict[str, float]:
        out = {f"{prefix}/loss": self.overall}
        out.update({f"{prefix}/loss_{name}": value for name, value in self.per_bucket.items()})
        out.update({f"{prefix}/loss_t{i + 1:02d}": value for i, value in enumerate(self.per_level)})
        return out


def _eval_forward_step(prepare_inputs: Callable) -> Callable:
    def forward_step(data_iterator: Any, model: torch.nn.Module):
        item = next(data_iterator)
        inputs = prepare_inputs(item["batch"], item["sample"])
        valid = inputs.pop("loss_mask")
        output = model(**inputs)
        target = item["sample"].target

        def loss_func(prediction: torch.Tensor):
            losses = []
            for i in range(prediction.shape[0]):
                total, count = masked_mse_sum(prediction[i:i + 1], target[i:i + 1], valid[i:i + 1])
                losses.append(total / count.clamp(min=1.0))
            per_sample = torch.stack(losses).detach()
            return per_sample.sum(), {"per_sample": per_sample, "level": item["level"]}

        return output, loss_func

    return forward_step


def _on_every_pipeline_rank(tensor: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=mpu.get_pipeline_model_parallel_last_rank(),
                       group=mpu.get_pipeline_model_parallel_group())
    return tensor


@torch.no_grad()
def evaluate_batches(model: Any, module: torch.nn.Module, objective: Objective, batches: Iterable[EvalBatch],
                     prepare_inputs: Callable, micro_batch_size: int, num_timesteps: int = 10, seed: int = 4321,
                     ) -> EvalResult:
    """The evaluation loss over `batches` (the same sequence on every rank of a model replica; DP ranks hold
    their own micro-batches of each global batch). `model` is what the schedule runs (DDP or the module),
    `module` the denoiser (for the pipeline shapes). Collective over the whole world."""
    from megatron.core import parallel_state as mpu

    from megatron_video.parallel.pipeline import batch_pipeline_shapes, run_forward_backward

    levels = eval_levels(num_timesteps)
    device = next(module.parameters()).device
    buckets: dict[str, torch.Tensor] = {}  # bucket -> float64 (levels + 1,): loss sums per level, sample count
    was_training = module.training
    module.eval()
    try:
        for batch in batches:
            items = []
            for mb in batch.micro_batches:
                noise = eval_noise(mb["x0"], list(mb["positions"]), seed)
                for j, level in enumerate(levels):
                    items.append({"batch": mb, "sample": objective.at_level(mb["x0"], noise, level), "level": j})
            recv, send = batch_pipeline_shapes(module, batch.micro_batches)
            out = run_forward_backward(_eval_forward_step(prepare_inputs), iter(items), model, len(items),
                                       micro_batch_size, recv, send, forward_only=True)
            acc = buckets.setdefault(batch.bucket, torch.zeros(num_timesteps + 1, dtype=torch.float64))
            for entry in out:  # empty except on the last pipeline stage
                acc[entry["level"]] += entry["per_sample"].double().sum().cpu()
            if out:
                acc[-1] += sum(mb["x0"].shape[0] for mb in batch.micro_batches)
    finally:
        module.train(was_training)
    names = sorted(buckets)
    table = torch.stack([buckets[n] for n in names]).to(device) if names else torch.zeros(0, num_timesteps + 1,
                                                                                       dtype=torch.float64)
    dist.all_reduce(table, group=mpu.get_data_parallel_group())
    table = _on_every_pipeline_rank(table).cpu()
    counts = table[:, -1]
    if names and bool((counts <= 0).any()):
        raise RuntimeError("an evaluation bucket has no samples after the reduction")
    per_bucket = {n: float(table[i, :-1].sum() / (counts[i] * num_timesteps)) for i, n in enumerate(names)}
    total = float(counts.sum())
    per_level = [float(v) for v in (table[:, :-1].sum(dim=0) / max(total, 1.0))]
    overall = float(table[:, :-1].sum() / max(total * num_timesteps, 1.0))
    return EvalResult(per_bucket, per_level, overall, {n: int(counts[i]) for i, n in enumerate(names)})


__all__ = ["EVAL_STREAM", "EvalBatch", "EvalResult", "bucket_name", "eval_levels", "eval_noise",
           "evaluate_batches"]
