"""Per-device memory of one training layout: model states, activations, backward workspace.

Model states (DESIGN §14): bf16 weights (2 B/param) + fp32 gradient buffer (4 B; our DDP reduces grads in
fp32) + distributed-optimizer state (fp32 main weights, Adam m and v: 12 B) sharded over DP x CP, i.e.
6 + 12/DP; the fp32 EMA is sharded like the optimizer (4/DP) unless `ema_replicated` (the training fork kept
an unsharded copy).

Activations are counted tensor by tensor from what autograd saves in `models/suv_mmdit/model.py` with bf16
streams (the block's elementwise work runs in the stream dtype, `models/suv_mmdit/elementwise.py`). Per token
of a stream and per block, in bytes (H hidden, F ffn, t = TP size, a = heads, sp = t under Megatron-SP):

  sequence shard (/sp):  attention half: LayerNorm input 2H + mean/rstd 8 + modulated input 2H +
                         gated-residual branch 2H;  FFN half: the same 6H + 8 plus fc1 input 2H
  full sequence:         the gathered q/k/v input 2H (saved once, after the all-gather)
  heads (/t):            q and k RMSNorm (fp32 input + normalised, 8H/t, rsqrt 4a/t each: torch's RMSNorm
                         keeps an fp32 copy on CPU, where this is measured; a fused GPU kernel may keep less),
                         the flattened attention output fed to the output projection 2H/t
  attention kernel:      q, k, v, out 8H/t + logsumexp 4a/t, per token of the attention layout (skiparse
                         pads the video to k^2 and repeats the text k times)
  FFN (/t):              fc1 output 2F/t (GELU input) + GELU output 2F/t

Each modulation also keeps an fp32 copy of its weight (E x 6H / t). Selective recompute (the FFN half of
every block, as the training fork) keeps only that half's bf16 inputs; full recompute keeps each block's
bf16 inputs and recomputes one block at a time in backward. On top, one block's backward needs gradient
buffers (the attention kernel's dq/dk/dv, the FFN's 4H-wide gradients): `backward_workspace_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_video.models.suv_mmdit.config import BlockSpec, SUVConfig
from megatron_video.planning.workload import ParamCount

RECOMPUTE_MODES = ("none", "selective", "full")
BF16 = 2
FP32 = 4
GIB = 1024 ** 3


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class Tokens:
    """One micro-batch's streams as one rank sees them: full lengths and the sequence-parallel shard size."""

    video: int
    text: int
    tp: int = 1
    sequence_parallel: bool = False

    @property
    def sp(self) -> int:
        return self.tp if self.sequence_parallel and self.tp > 1 else 1

    def shard(self, n: int) -> int:
        return _ceil_to(n, self.sp) // self.sp

    def full(self, n: int) -> int:
        return _ceil_to(n, self.sp)


def _attention_half(cfg: SUVConfig, spec: BlockSpec, tok: Tokens) -> float:
    h, a, t = cfg.hidden_size, cfg.num_heads, tok.tp
    text_q = not spec.context_pre_only
    n, n_s = tok.full(tok.video), tok.shard(tok.video)
    n_text, n_text_s = tok.full(tok.text), tok.shard(tok.text)
    out = (6 * h + 8) * (n_s + n_text_s)  # LayerNorm in/stats, modulate, (text residual below)
    if not text_q:
        out -= 2 * h * n_text_s  # the last block has no text residual
    out += 2 * h * (n + n_text)  # gathered q/k/v inputs
    qk_norm = 2 * (8 * h / t + 4 * a / t)
    out += qk_norm * n + qk_norm / 2 * n_text * (2 if text_q else 1)
    out += 2 * h / t * (n + (n_text if text_q else 0))  # output-projection inputs
    # the kernel: k, v over all keys; q and out over the queries; per layout token
    k = spec.k
    n_layout = _ceil_to(n, k * k) if k > 1 else n
    keys = n_layout + k * n_text
    queries = n_layout + (k * n_text if text_q else 0)
    out += 4 * h / t * keys + (4 * h / t + 4 * a / t) * queries
    if spec.skip_in is not None:
        out += 4 * h * (n_s + n_text_s)  # long-skip linear input [x ; skip], bf16
    return out * 1.0


def _ffn_half(cfg: SUVConfig, spec: BlockSpec, tok: Tokens) -> float:
    h, f, t = cfg.hidden_size, cfg.ffn_hidden_size, tok.tp
    streams = tok.shard(tok.video) + (0 if spec.context_pre_only else tok.shard(tok.text))
    full = tok.full(tok.video) + (0 if spec.context_pre_only else tok.full(tok.text))
    return (8 * h + 8) * streams + 4 * f / t * full


def _modulation_copy(cfg: SUVConfig, tp: int) -> float:
    return FP32 * cfg.timestep_embed_dim * 6 * cfg.hidden_size / tp


def _block_inputs(cfg: SUVConfig, tok: Tokens) -> float:
    return BF16 * cfg.hidden_size * (tok.shard(tok.video) + tok.shard(tok.text))


def block_activation_bytes(cfg: SUVConfig, spec: BlockSpec, tok: Tokens, recompute: str, micro_batch: int = 1
                           ) -> float:
    """Bytes one block keeps from forward to backward for one micro-batch."""
    b, copy = micro_batch, _modulation_copy(cfg, tok.tp)  # the weight copies do not scale with the batch
    if recompute == "none":
        return b * (_attention_half(cfg, spec, tok) + _ffn_half(cfg, spec, tok)) + 2 * copy
    if recompute == "selective":
        return b * (_attention_half(cfg, spec, tok) + _block_inputs(cfg, tok)) + copy
    if recompute == "full":
        return b * _block_inputs(cfg, tok)
    raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")


def block_recompute_bytes(cfg: SUVConfig, spec: BlockSpec, tok: Tokens, recompute: str, micro_batch: int = 1
                          ) -> float:
    """Extra bytes alive while backward recomputes this block (on top of what it keeps)."""
    if recompute == "full":
        return block_activation_bytes(cfg, spec, tok, "none", micro_batch)
    if recompute == "selective":
        return micro_batch * _ffn_half(cfg, spec, tok) + _modulation_copy(cfg, tok.tp)
    return 0.0


def outside_blocks_bytes(cfg: SUVConfig, tok: Tokens, micro_batch: int = 1) -> tuple[float, float]:
    """(embeddings + shared RoPE tables, final layer) bytes of one micro-batch. The final layer (two
    LayerNorms, modulate, output-projection input, its modulation weight copy) is freed before the blocks'
    backward; the embeddings' inputs live until the end."""
    h, p = cfg.hidden_size, cfg.patch_size
    channels = cfg.in_channels + cfg.condition_channels
    embed = micro_batch * BF16 * (tok.video * channels * p * p + tok.text * cfg.caption_channels)
    rope = 2 * FP32 * cfg.head_dim * tok.full(tok.video)
    final = micro_batch * (2 * (4 * h + 8) + 4 * h + 2 * h) * tok.shard(tok.video)
    final += FP32 * cfg.timestep_embed_dim * 2 * h / tok.tp
    return embed + rope, final


def activation_peak_bytes(cfg: SUVConfig, specs: list[BlockSpec], tok: Tokens, micro_batch: int,
                          recompute: str, in_flight: int = 1, first_stage: bool = True, last_stage: bool = True
                          ) -> float:
    """Peak activation bytes of a pipeline stage holding `specs`: `in_flight` micro-batches stored (1F1B keeps
    up to PP of them on the first stage) while backward recomputes (or walks) one block. Backward frees
    blocks from the last, so the recompute transient peaks where the stored prefix plus one recomputed block
    is largest."""
    kept = [block_activation_bytes(cfg, s, tok, recompute, micro_batch) for s in specs]
    extra = [block_recompute_bytes(cfg, s, tok, recompute, micro_batch) for s in specs]
    head, tail = outside_blocks_bytes(cfg, tok, micro_batch)
    head, tail = (head if first_stage else 0.0), (tail if last_stage else 0.0)
    others = (in_flight - 1) * (head + sum(kept) + tail)
    peak, prefix = head + sum(kept) + tail, 0.0
    for keep, ext in zip(kept, extra):
        prefix += keep
        peak = max(peak, head + prefix + ext)
    return others + peak


def backward_workspace_bytes(cfg: SUVConfig, specs: list[BlockSpec], tok: Tokens, micro_batch: int) -> float:
    """Transient gradient buffers of one block's backward, not counted in the saved activations: the attention
    kernel's dq, dk, dv (bf16) plus an fp32 dq accumulator over the attention layout, or the FFN's fp32 and
    bf16 gradients of its 4H intermediate, whichever is larger. Not measured by `probe.SavedTensorMeter`."""
    h, f, t = cfg.hidden_size, cfg.ffn_hidden_size, tok.tp
    worst = 0.0
    for spec in specs:
        k = spec.k
        layout = (_ceil_to(tok.full(tok.video), k * k) if k > 1 else tok.full(tok.video)) + k * tok.full(tok.text)
        attention = (6 + 4) * h / t * layout
        ffn = (4 + 2) * f / t * (tok.full(tok.video) + tok.full(tok.text))
        worst = max(worst, attention, ffn)
    return micro_batch * worst


@dataclass(frozen=True)
class StateBytes:
    weights: float
    grads: float
    optimizer: float
    ema: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ema


def model_state_bytes(params: ParamCount, tp: int, shard_ranks: int, ema_replicated: bool = False) -> StateBytes:
    """6 + 12/DP bytes per local parameter, plus the fp32 EMA (sharded over the same ranks unless replicated).
    `shard_ranks` = DP x CP (megatron shards the optimizer over the data-parallel group with CP)."""
    local = params.per_rank(tp)
    return StateBytes(
        weights=BF16 * local, grads=FP32 * local, optimizer=3 * FP32 * local / shard_ranks,
        ema=FP32 * local / (1 if ema_replicated else shard_ranks),
    )


__all__ = [
    "GIB", "RECOMPUTE_MODES", "StateBytes", "Tokens", "activation_peak_bytes", "backward_workspace_bytes",
    "block_activation_bytes",
    "block_recompute_bytes", "model_state_bytes", "outside_blocks_bytes",
]
