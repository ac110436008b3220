"""Step time of one layout: compute at an efficiency factor plus the communication each parallelism adds.

Per device and global batch (DESIGN §14; e = 2 bytes, s = tokens a CP rank holds, h = hidden size):
- compute: training FLOPs 6·N·S + 12·d·S·ΣS/k (`training/flops.py`'s formula, per block), plus the forward
  again for recomputed parts, split over TP x CP, at `peak x compute_efficiency`;
- TP + Megatron-SP: 8·b·s·h·e·(t−1)/t per block (all-gathers and reduce-scatters of attention and FFN), one
  more forward's share for recompute (x1.25 selective: the FFN half; x1.5 full);
- CP: the wire bytes of every CP collective the model issues, from `models/suv_mmdit/cp_comm.planned_cp_traffic`
  (the same block plans, index maps and redistributions the model runs; checked against CommCounter there):
  Ulysses all-to-alls of q, k, v, out within each block's Ulysses group, hidden-state all-to-alls at layout
  changes, text-head gathers; `cp_block_bytes` is the closed form (Ulysses: 8·b·s·h·e·(P−1)/P² per device);
- PP: 1F1B takes (m + p − 1) micro-batch slots of the slowest stage, i.e. a bubble (p−1)/(m+p−1); each
  boundary sends the two streams plus the long skips crossing it, forward and backward;
- DP: one reduce-scatter of fp32 grads and one all-gather of bf16 params over DP x CP per step, exposed as
  the trainer runs them (`DataParallelOverlap`: the trainer's --overlap-grad-reduce, --overlap-param-gather and
  --ddp-bucket-size): without overlap one bucket after the backward; with it, per bucket, hidden behind the
  last micro-batch's backward (reduce-scatter) and the first micro-batch's forward (all-gather) except the one
  bucket that has nothing left to hide behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from megatron_video.models.suv_mmdit.config import BlockSpec, SUVConfig
from megatron_video.planning.cluster import ClusterSpec
from megatron_video.planning.workload import block_params, embed_params, final_params, pipeline_split

BF16 = 2
RECOMPUTE_TP_FACTOR = {"none": 1.0, "selective": 1.25, "full": 1.5}
RECOMPUTE_CP_FACTOR = {"none": 1.0, "selective": 1.0, "full": 1.5}  # the FFN half has no CP traffic


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int
    micro_batch: int
    recompute: str
    cp_strategy: str = "skiparse"

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def micro_batches(self, global_batch: int) -> int:
        return global_batch // (self.dp * self.micro_batch)


def block_flops(cfg: SUVConfig, spec: BlockSpec, video: int, text: int) -> float:
    """Training FLOPs (forward + backward) of one block for one sample: 6·params·tokens + attention / k."""
    seq = video + text
    dense = 6.0 * block_params(cfg, spec).total * seq
    return dense + 12.0 * cfg.hidden_size * seq * seq / spec.k


def recompute_flops(cfg: SUVConfig, spec: BlockSpec, video: int, text: int, recompute: str) -> float:
    """Forward FLOPs repeated in backward: the whole block (full) or its FFN half (selective)."""
    if recompute == "full":
        return block_flops(cfg, spec, video, text) / 3.0
    if recompute == "selective":
        tokens = video + (0 if spec.context_pre_only else text)
        return 2.0 * 2 * cfg.hidden_size * cfg.ffn_hidden_size * tokens
    return 0.0


def cp_block_bytes(ulysses: int, moved: float, cp: int, tp: int, video_local: int, hidden: int,
                   micro_batch: int) -> float:
    """Closed form of the CP bytes one device sends for one block, forward + backward (recompute excluded):
    q, k, v, out within a Ulysses group of `ulysses` ranks plus `moved` hidden-state tensors redistributed."""
    if cp == 1:
        return 0.0
    per_rank = micro_batch * video_local * hidden * BF16  # this CP rank's tokens, all heads
    attention = 4 * per_rank / tp * (ulysses - 1) / ulysses  # q, k, v, out over the TP rank's heads
    moves = moved * per_rank / tp  # hidden states are split over TP by the sequence
    return 2.0 * (attention + moves)


@lru_cache(maxsize=1024)
def cp_wire_bytes(cfg: SUVConfig, cp: int, tp: int, grid: tuple[int, int, int], text_tokens: int, strategy: str
                  ) -> tuple[tuple[float, ...], float]:
    """(per-block, model-exit) bytes one rank sends in the CP group for one sample, forward + backward."""
    blocks = [0.0] * cfg.num_blocks
    if cp == 1:
        return tuple(blocks), 0.0
    from megatron_video.models.suv_mmdit.cp_comm import planned_cp_traffic

    exit_bytes = 0.0
    for c in planned_cp_traffic(cfg, cp, tp, tp > 1, grid, 1, text_tokens, BF16, strategy):  # type: ignore[arg-type]
        if c.block is None:
            exit_bytes += c.wire_bytes
        else:
            blocks[c.block] += c.wire_bytes
    return tuple(blocks), exit_bytes


@dataclass(frozen=True)
class DataParallelOverlap:
    """The trainer's data-parallel overlap flags (megatron's DistributedDataParallelConfig)."""

    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bucket_size: int | None = None  # parameters; None: megatron's default max(40M, 1M x DP)

    def buckets(self, local_params: float, dp_size: int) -> int:
        """Buckets of the first pipeline stage (megatron keeps one bucket without overlap_grad_reduce)."""
        if not self.overlap_grad_reduce:
            return 1
        size = self.bucket_size or max(40_000_000, 1_000_000 * dp_size)
        return max(1, -(-int(local_params) // size))

    def exposed(self, reduce_time: float, gather_time: float, backward: float, forward: float, buckets: int,
                ) -> float:
        """Seconds of DP communication not hidden: a bucket's collective starts once the backward has made its
        gradients (the forward needs its weights), so all but the last (first) bucket run behind the rest of
        the last micro-batch's backward (the first micro-batch's forward) while the wire keeps up."""
        def part(total: float, hidden_by: float, on: bool) -> float:
            return total if not on or buckets == 1 else max(total / buckets, total - hidden_by)

        return (part(reduce_time, backward, self.overlap_grad_reduce)
                + part(gather_time, forward, self.overlap_param_gather))


NO_OVERLAP = DataParallelOverlap()  # the trainer's defaults


@dataclass(frozen=True)
class StepTime:
    compute: float
    tp_comm: float
    cp_comm: float
    pp_p2p: float
    bubble: float
    dp_comm: float

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.cp_comm + self.pp_p2p + self.bubble + self.dp_comm


def step_time(cfg: SUVConfig, layout: Layout, grid: tuple[int, int, int], text_tokens: int, global_batch: int,
              cluster: ClusterSpec, local_params: float, overlap: DataParallelOverlap = NO_OVERLAP,
              ) -> StepTime:
    """Seconds per global batch on one device, for video tokens `grid` (T, H/p, W/p); `local_params` =
    parameters on the busiest device; `overlap` = the trainer's DP overlap flags."""
    video_tokens = grid[0] * grid[1] * grid[2]
    t, p, b = layout.tp, layout.cp, layout.micro_batch
    m = layout.micro_batches(global_batch)
    video_local = -(-video_tokens // p)
    cp_blocks, cp_exit = cp_wire_bytes(cfg, p, t, tuple(grid), text_tokens, layout.cp_strategy)
    flops_rate = cluster.peak_tflops * 1e12 * cluster.compute_efficiency
    tp_bw, cp_bw = cluster.bandwidth(t), cluster.bandwidth(t * p)
    specs = cfg.block_specs()
    stage_times: list[tuple[float, float, float]] = []
    start = 0
    for i, count in enumerate(pipeline_split(len(specs), layout.pp)):
        flops = tp_bytes = cp_bytes = 0.0
        for spec in specs[start:start + count]:
            flops += block_flops(cfg, spec, video_tokens, text_tokens)
            flops += recompute_flops(cfg, spec, video_tokens, text_tokens, layout.recompute)
            if t > 1:
                tokens = video_local + text_tokens
                tp_bytes += 8.0 * b * tokens * cfg.hidden_size * BF16 * (t - 1) / t
            cp_bytes += b * cp_blocks[spec.index]
        if i == 0:
            flops += 6.0 * embed_params(cfg).total * (video_tokens + text_tokens)
        if i == layout.pp - 1:
            flops += 6.0 * final_params(cfg).total * video_tokens
            cp_bytes += b * cp_exit
        stage_times.append((b * flops / (t * p) / flops_rate, tp_bytes * RECOMPUTE_TP_FACTOR[layout.recompute] / tp_bw,
                            cp_bytes * RECOMPUTE_CP_FACTOR[layout.recompute] / cp_bw))
        start += count
    slowest = max(stage_times, key=sum)
    compute, tp_time, cp_time = (m * x for x in slowest)
    bubble = (layout.pp - 1) * sum(slowest)
    p2p = 0.0
    if layout.pp > 1:
        from megatron_video.planning.workload import skips_crossing

        crossing = max(skips_crossing(cfg, layout.pp))
        sp = t if t > 1 else 1
        send = 2 * (1 + crossing) * b * (video_local + text_tokens) / sp * cfg.hidden_size * BF16  # fwd + bwd
        p2p = (m + layout.pp - 1) * send / cluster.bandwidth(t * p * layout.dp * 2)
    shard = layout.dp * p
    dp_time = 0.0
    if shard > 1:
        wire = local_params * (shard - 1) / shard / cluster.bandwidth(t * shard)
        one_micro = compute / m  # one micro-batch of the slowest stage: forward ~1/3, backward ~2/3
        dp_time = overlap.exposed(4 * wire, 2 * wire, 2 * one_micro / 3, one_micro / 3,  # fp32 grads, bf16 params
                                  overlap.buckets(local_params, shard))
    return StepTime(compute, tp_time, cp_time, p2p, bubble, dp_time)


def model_flops_per_step(cfg: SUVConfig, video_tokens: int, text_tokens: int, global_batch: int) -> float:
    """The useful FLOPs of a step (no recompute), for MFU; the same formula as `training/flops.py`."""
    from megatron_video.planning.workload import model_params
    from megatron_video.training.flops import training_flops_per_sample

    sparsity = [spec.k for spec in cfg.block_specs()]
    return global_batch * training_flops_per_sample(model_params(cfg).total, cfg.hidden_size, sparsity,
                                                    video_tokens, text_tokens)


__all__ = ["NO_OVERLAP", "DataParallelOverlap", "Layout", "StepTime", "block_flops", "cp_block_bytes", "cp_wire_bytes",
           "model_flops_per_step", "recompute_flops", "step_time"]
