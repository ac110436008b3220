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
"""

from __future__ import annotations

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
    dense = video_valid is None and text_valid is None and (k == 1 or padded_length(n, k) == n)
    if not dense:
        video_valid = valid_or_all(video_valid, b, n, q_video.device)
        text_valid = valid_or_all(text_valid, b, k_text.shape[0], q_video.device)
    if k > 1:
        n_p = padded_length(n, k)
        q_video, k_video, v_video = (to_skiparse(pad_sequence(t, n_p), k, mode) for t in (q_video, k_video, v_video))
        q_text = repeat_text(q_text, k) if q_text is not None else None
        k_text, v_text = repeat_text(k_text, k), repeat_text(v_text, k)
        if not dense:
            video_valid, text_valid = skiparse_layout_valid(video_valid, k, mode), text_valid.repeat(k, 1)
    n_video_q = q_video.shape[0]
    q = q_video if q_text is None else torch.cat([q_video, q_text], dim=0)
    key = torch.cat([k_video, k_text], dim=0)
    value = torch.cat([v_video, v_text], dim=0)
    key_valid = None if dense else torch.cat([video_valid, text_valid], dim=1)
    out = attn_fn(q, key, value, key_valid, scale=scale)
    out_video, out_text = out[:n_video_q], (out[n_video_q:] if q_text is not None else None)
    if k > 1:
        out_video = from_skiparse(out_video, k, mode)[:n]
        out_text = average_text(out_text, k) if out_text is not None else None
    return out_video, out_text


__all__ = [
    "AttentionFn", "average_text", "from_skiparse", "joint_attention", "pad_sequence", "padded_length",
    "repeat_text", "skiparse_layout_valid", "to_skiparse", "valid_or_all",
]
