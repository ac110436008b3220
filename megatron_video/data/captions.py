"""Captions: cleaning, choice among list captions, quality phrases, CFG dropout, tokenisation hook.

Randomness (which caption of a list, whether to drop it) is drawn from a generator seeded by
(seed, sample id, epoch), so it is reproducible on resume and identical on TP/CP peers.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from megatron_video.data.config import CaptionConfig
from megatron_video.data.metadata import SampleRecord

# Open-Sora 1.3 style scales: (upper bound exclusive, word); the last word applies to everything above.
AESTHETIC_SCALE = ((4.0, "terrible"), (4.5, "very poor"), (5.0, "poor"), (5.5, "fair"), (6.0, "good"),
                   (6.5, "very good"), (float("inf"), "excellent"))
MOTION_SCALE = ((0.5, "very low"), (2.0, "low"), (5.0, "fair"), (10.0, "high"), (20.0, "very high"),
                (float("inf"), "extremely high"))

_URL = re.compile(r"https?://\S+|www\.\S+")
_TAG = re.compile(r"<[^>]{1,100}>")
_SPACE = re.compile(r"\s+")
_REPEAT_PUNCT = re.compile(r"([,.;:!?])\1+")


def clean_caption(text: str) -> str:
    """Unescape HTML, drop tags and URLs, collapse whitespace and repeated punctuation."""
    text = html.unescape(text)
    text = _URL.sub("", _TAG.sub(" ", text))
    text = _REPEAT_PUNCT.sub(r"\1", text)
    text = _SPACE.sub(" ", text).strip()
    return re.sub(r"\s+([,.;:!?])", r"\1", text)


def _scale_word(value: float, scale: Sequence[tuple[float, str]]) -> str:
    for bound, word in scale:
        if value < bound:
            return word
    return scale[-1][1]


def aesthetic_phrase(score: float) -> str:
    return f"aesthetic score: {_scale_word(score, AESTHETIC_SCALE)}."


def motion_phrase(score: float) -> str:
    return f"motion strength: {_scale_word(score, MOTION_SCALE)}."


def camera_phrase(camera: str) -> str:
    return f"camera motion: {clean_caption(camera.replace('_', ' '))}."


def caption_rng(seed: int, sample_id: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, sample_id, epoch, 0xCA9])


def caption_variants(rec: SampleRecord, cfg: CaptionConfig) -> list[str]:
    """Every caption of the sample, cleaned and with the configured quality phrases."""
    extra = []
    if cfg.add_aesthetic_phrase and rec.aesthetic is not None:
        extra.append(aesthetic_phrase(rec.aesthetic))
    if cfg.add_motion_phrase and rec.motion is not None:
        extra.append(motion_phrase(rec.motion))
    if cfg.add_camera_phrase and rec.camera:
        extra.append(camera_phrase(rec.camera))
    out = []
    for cap in rec.captions:
        text = clean_caption(cap) if cfg.clean else cap
        if extra:
            text = (text.rstrip(".") + ". " if text else "") + " ".join(extra)
        out.append(text)
    return out


def choose_caption(num_variants: int, cfg_dropout: float, seed: int, sample_id: int, epoch: int) -> int:
    """Index of this epoch's caption variant, or -1 when dropped for classifier-free guidance."""
    rng = caption_rng(seed, sample_id, epoch)
    # draw both numbers unconditionally so one setting does not shift the other's stream
    pick, drop = int(rng.integers(0, num_variants)), rng.random()
    return -1 if drop < cfg_dropout else pick


def build_caption(rec: SampleRecord, cfg: CaptionConfig, seed: int, epoch: int) -> str:
    """The training caption of a sample for this epoch ('' when dropped for classifier-free guidance)."""
    j = choose_caption(len(rec.captions), cfg.cfg_dropout, seed, rec.index, epoch)
    return "" if j < 0 else caption_variants(rec, cfg)[j]


Tokenizer = Callable[[list[str]], Mapping[str, Any]]


def tokenize_captions(captions: list[str], tokenizers: Mapping[str, Tokenizer]) -> dict[str, Any]:
    """Run every tokenizer over the captions; keys are prefixed by the tokenizer name.

    A tokenizer is any callable list[str] -> mapping (e.g. {"input_ids": (B, L), "attention_mask": (B, L)}),
    such as a partial of a Hugging Face tokenizer with padding="max_length" and the encoder's max length.
    """
    out: dict[str, Any] = {}
    for name, tok in tokenizers.items():
        for key, value in tok(list(captions)).items():
            out[f"{name}_{key}"] = value
    return out
