"""Skiparse attention: the sparse sequence layouts of the SUV model, as pure tensor rearrangements.

All tensors are sequence-first, `(S, B, ...)`. With sparsity k the video sequence (length N) is zero-padded at
the end to N_p, a multiple of k^2, and cut into k sub-sequences that are stacked into the batch dimension
(sub-sequence r of sample b goes to batch index r*B + b):

- single skip: token j belongs to sub-sequence j mod k (a stride-k subsample);
- group skip: token j belongs to sub-sequence (j div k) mod k (runs of k tokens, one run every k^2).

Each sub-sequence attends jointly with a full copy of the text; the k text outputs are averaged. Padding and
invalid tokens are excluded as keys through a per-key validity vector, never through an L x L mask.

The rearrangement and the attention call are separate functions so that a context-parallel layout can swap
either one.

Stage order (`joint_attention_in_order`, stage_order.py): inside a stage of sparsity k, the model keeps the video
stream in one token order from which the sub-sequences of *both* patterns are strided views. With the padded
token id j = n k^2 + m k + u (u, m < k), row p = m (N_p / k) + n k + u holds token j: group sub-sequence m is
the contiguous block of rows m N_p/k ..., single sub-sequence u the rows p = u mod k. Inside a sub-sequence the
token order differs from `to_skiparse` (single skip), which attention does not see: it is equivariant in its
queries and invariant in its keys, and RoPE is applied with true positions before.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from megatron_video.models.suv_mmdit.config import AttentionMode

AttentionFn = Callable[..., torch.Tensor]


def padded_length(n: int, k: int) -> int:
    """N rounded up to a multiple of k^2 (both patterns pad to k^2, as released)."""
    block = k * k
    return -(-n // block) * block


def pad_sequence(x: torch.Tensor, length: int, value: float | bool = 0) -> torch.Tensor:
    """Append `length - S` entries equal to `value` along dim 0."""
    extra = length - x.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad a sequence of {x.shape[0]} down to {length}")
    if extra == 0:
        return x
    return torch.cat([x, x.new_full((extra, *x.shape[1:]), value)], dim=0)


def to_skiparse(x: torch.Tensor, k: int, mode: AttentionMode) -> torch.Tensor:
    """(N_p, B, *rest) -> (N_p / k, k * B, *rest); N_p must be a multiple of k^2."""
    n, b, rest = x.shape[0], x.shape[1], x.shape[2:]
    if n % (k * k) != 0:
        raise ValueError(f"sequence length {n} is not a multiple of k^2 = {k * k}; pad it first")
    if mode == "single":  # (g k) b -> g (k b)
        return x.reshape(n // k, k * b, *rest)
    if mode == "group":  # (n m u) b -> (n u) (m b)
        x = x.reshape(n // (k * k), k, k, b, *rest).transpose(1, 2)
        return x.reshape(n // k, k * b, *rest)
    raise ValueError(f"skiparse mode must be 'single' or 'group', got {mode!r}")


def from_skiparse(x: torch.Tensor, k: int, mode: AttentionMode) -> torch.Tensor:
    """Inverse of `to_skiparse`: (N_p / k, k * B, *rest) -> (N_p, B, *rest)."""
    g, kb, rest = x.shape[0], x.shape[1], x.shape[2:]
    b = kb // k
    if mode == "single":
        return x.reshape(g * k, b, *rest)
    if mode == "group":
        x = x.reshape(g // k, k, k, b, *rest).transpose(1, 2)  # (n, u, m) -> (n, m, u)
        return x.reshape(g * k, b, *rest)
    raise ValueError(f"skiparse mode must be 'single' or 'group', got {mode!r}")


def repeat_text(c: torch.Tensor, k: int) -> torch.Tensor:
    """(L, B, *rest) -> (L, k * B, *rest): every sub-sequence gets the full text (batch index r*B + b)."""
    return c.repeat(1, k, *([1] * (c.dim() - 2)))


def average_text(c: torch.Tensor, k: int) -> torch.Tensor:
    """(L, k * B, *rest) -> (L, B, *rest): the arithmetic mean of the k text copies."""
    return c.reshape(c.shape[0], k, c.shape[1] // k, *c.shape[2:]).mean(dim=1)


def skiparse_layout_valid(video_valid: torch.Tensor, k: int, mode: AttentionMode) -> torch.Tensor:
    """Key validity (B, N) -> (k * B, N_p / k) in the skiparse layout; pads are invalid."""
    v = pad_sequence(video_valid.t(), padded_length(video_valid.shape[1], k), False)
    return to_skiparse(v, k, mode).t()


def valid_or_all(valid: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor:
    """`valid`, or (B, N) all True for None (built on the device from shapes: no host read)."""
    return valid if valid is not None else torch.ones(b, n, dtype=torch.bool, device=device)


def joint_attention(
    q_video: torch.Tensor, k_video: torch.Tensor, v_video: torch.Tensor,
    q_text: torch.Tensor | None, k_text: torch.Tensor, v_text: torch.Tensor,
    video_valid: torch.Tensor | None, text_valid: torch.Tensor | None,
    *, k: int, mode: AttentionMode, scale: float, attn_fn: AttentionFn,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Joint attention of [video ; text] queries over [video ; text] keys, dense (k = 1) or skiparse.

    q/k/v: (S, B, heads, head_dim), video first; `q_text` may be None (the last block needs no text output).
    video_valid (B, N) and text_valid (B, L) are boolean key-validity vectors, or both None when every token is
    valid: then, unless this pattern pads the sequence, the kernel runs without a mask. Returns (video out,
    text out).
    """
    n, b = q_video.shape[0], q_video.shape[1]
    n_p = padded_length(n, k)
    dense = video_valid is None and text_valid is None and n_p == n
    if not dense:
        video_valid = valid_or_all(video_valid, b, n, q_video.device)
        text_valid = valid_or_all(text_valid, b, k_text.shape[0], q_video.device)
    q, key, value = (join_text(natural_subsequences(pad_sequence(video, n_p), k, mode), text)
                     for video, text in ((q_video, q_text), (k_video, k_text), (v_video, v_text)))
    key_valid = None
    if not dense:
        if k > 1:
            video_valid, text_valid = skiparse_layout_valid(video_valid, k, mode), text_valid.repeat(k, 1)
        key_valid = torch.cat([video_valid, text_valid], dim=1)
    out_video, out_text = split_rows(attn_fn(q, key, value, key_valid, scale=scale), n_p // k, q_text is not None)
    if k > 1:
        out_video = from_skiparse(out_video, k, mode)[:n]
        out_text = average_text(out_text, k) if out_text is not None else None
    return out_video, out_text


def natural_subsequences(x: torch.Tensor, k: int, mode: AttentionMode) -> torch.Tensor:
    """A view of a natural-order (N_p, B, *rest) stream as its k sub-sequences, (k, B, *seq, *rest), in
    `to_skiparse`'s order: single skip (k, B, N_p / k, ...); group skip (k, B, N_p / k^2, k, ...), the last two
    dims one sub-sequence (token n k^2 + m k + u of sub-sequence m at position n k + u). k = 1: (1, B, N, ...)."""
    n, b, rest = x.shape[0], x.shape[1], x.shape[2:]
    tail = tuple(range(3, 3 + len(rest)))
    if k == 1 or mode == "single":  # token i k + r: sub-sequence r, position i
        return x.reshape(n // k, k, b, *rest).permute(1, 2, 0, *tail)
    if mode == "group":
        return x.reshape(n // (k * k), k, k, b, *rest).permute(1, 3, 0, 2, *(d + 1 for d in tail))
    raise ValueError(f"skiparse mode must be 'single' or 'group', got {mode!r}")


def join_text(video: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """[video sub-sequence r ; text] for every r, in one copy: the kernels' input (S, k * B, heads, d), a
    sequence-first view of (k * B, S, heads, d) memory.

    video: (k, B, *seq, heads, d), a view of the stream (`natural_subsequences`, or `subsequences` moved to the
    front; `seq` one or two dims, one sub-sequence); text: (L, B, heads, d) or None (no text rows). Batch-major
    memory is what flash-attn's and the NPU's packed (TND) layouts are, so their reshapes are views, and on CPU
    SDPA runs the many short sub-sequences faster from it than from sequence-first memory. One autograd node:
    its backward hands back views of the gradient (video) and the k-copy sum (text), no zero-filled buffers."""
    return _JoinText.apply(video, text)


class _JoinText(torch.autograd.Function):
    @staticmethod
    def forward(ctx, video: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        k, b, heads, d = video.shape[0], video.shape[1], video.shape[-2], video.shape[-1]
        rows = math.prod(video.shape[2:-2])
        length = 0 if text is None else text.shape[0]
        joined = video.new_empty(k, b, rows + length, heads, d)
        joined[:, :, :rows].view(video.shape).copy_(video)
        if text is not None:  # every sub-sequence gets the full text: batch index r * B + b
            joined[:, :, rows:].copy_(text.transpose(0, 1)[None].expand(k, b, length, heads, d))
        ctx.video_shape, ctx.rows = video.shape, rows
        return joined.view(k * b, rows + length, heads, d).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        k, b = ctx.video_shape[0], ctx.video_shape[1]
        grad = grad.transpose(0, 1).reshape(k, b, grad.shape[0], *grad.shape[2:])
        grad_video = grad[:, :, :ctx.rows].reshape(ctx.video_shape) if ctx.needs_input_grad[0] else None
        # needs_input_grad[1] is False for a None text as well
        grad_text = grad[:, :, ctx.rows:].sum(dim=0).transpose(0, 1) if ctx.needs_input_grad[1] else None
        return grad_video, grad_text


def split_rows(out: torch.Tensor, video_rows: int, has_text: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's output (S, B, heads, d) -> its video rows and text rows (None without text queries).

    Split batch-major: the backward then joins the two gradients by one cat in the (B, S, heads, d) memory layout
    the kernels write and read, with no zero-filled buffer, add or copy of its own (two slices would cost each a
    zeroed buffer of the whole output and a copy, then an add)."""
    if not has_text:
        return out, None
    video, text = out.transpose(0, 1).split([video_rows, out.shape[0] - video_rows], dim=1)
    return video.transpose(0, 1), text.transpose(0, 1)


def subsequences(x: torch.Tensor, k: int, mode: AttentionMode) -> torch.Tensor:
    """Stage-ordered (N_p, B, *rest) -> (N_p / k, k, B, *rest), sub-sequence r at [:, r]; a view of a contiguous
    stream (k = 1: the one sub-sequence)."""
    n, rest = x.shape[0], x.shape[1:]
    if mode == "group":
        return x.reshape(k, n // k, *rest).transpose(0, 1)
    return x.reshape(n // k, k, *rest)


def from_subsequences(x: torch.Tensor, mode: AttentionMode) -> torch.Tensor:
    """Inverse of `subsequences`: (N_p / k, k, B, *rest) -> stage-ordered (N_p, B, *rest) (one copy at most)."""
    if mode == "group":
        x = x.transpose(0, 1)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def stage_layout_valid(video_valid: torch.Tensor, k: int, mode: AttentionMode) -> torch.Tensor:
    """Key validity of a stage-ordered stream, (N_p, B) -> (k * B, N_p / k) in the sub-sequence layout."""
    laid = subsequences(video_valid, k, mode)
    return laid.reshape(laid.shape[0], -1).t()


def joint_attention_in_order(
    q_video: torch.Tensor, k_video: torch.Tensor, v_video: torch.Tensor,
    q_text: torch.Tensor | None, k_text: torch.Tensor, v_text: torch.Tensor,
    video_valid: torch.Tensor | None, text_valid: torch.Tensor | None,
    *, k: int, mode: AttentionMode, scale: float, attn_fn: AttentionFn,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`joint_attention` on a video stream already in its stage order (padded to N_p, see the module docstring):
    no padding and no rearrangement here, the sub-sequences are views that the [video ; text] concatenation
    copies once. q/k/v are (S, B, heads, head_dim). video_valid: (k * B, N_p / k) in this block's sub-sequence
    layout (`stage_layout_valid`), text_valid (B, L); both None when every key is valid (the kernel then runs
    without a mask). Returns the video output in the stage order (N_p rows) and the text output (k-copy mean)
    or None."""
    n_p, b = q_video.shape[0], q_video.shape[1]
    g, text_len = n_p // k, k_text.shape[0]
    key_valid = None
    if video_valid is not None or text_valid is not None:
        video_valid = valid_or_all(video_valid, k * b, g, q_video.device)
        text_valid = valid_or_all(text_valid, b, text_len, q_video.device).repeat(k, 1)
        key_valid = torch.cat([video_valid, text_valid], dim=1)
    q, key, value = (join_text(subsequences(video, k, mode).movedim((1, 2), (0, 1)), text)
                     for video, text in ((q_video, q_text), (k_video, k_text), (v_video, v_text)))
    out = attn_fn(q, key, value, key_valid, scale=scale)
    out, out_text = split_rows(out, g, q_text is not None)
    out_video = from_subsequences(out.reshape(g, k, b, *out.shape[2:]), mode)
    return out_video, average_text(out_text, k) if out_text is not None else None


__all__ = [
    "AttentionFn", "average_text", "from_skiparse", "from_subsequences", "join_text", "joint_attention",
    "joint_attention_in_order", "natural_subsequences", "pad_sequence", "padded_length", "repeat_text",
    "skiparse_layout_valid", "split_rows", "stage_layout_valid", "subsequences", "to_skiparse", "valid_or_all",
]
