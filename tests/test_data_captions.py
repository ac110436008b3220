"""Caption cleaning, phrases, seeded CFG dropout, tokenisation hook."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_video.data.captions import (
    aesthetic_phrase,
    build_caption,
    clean_caption,
    motion_phrase,
    tokenize_captions,
)
from megatron_video.data.config import CaptionConfig
from megatron_video.data.loader import collate_samples
from megatron_video.data.metadata import SampleRecord


def rec(i: int, caps: tuple[str, ...] = ("A cat.",), **kw: object) -> SampleRecord:
    return SampleRecord(i, f"{i}.mp4", caps, False, 64, 64, 30, 24.0, **kw)  # type: ignore[arg-type]


def test_clean_caption() -> None:
    raw = "  A <b>red</b> ball&amp;cube ,, see https://x.y/z   rolling!!  "
    assert clean_caption(raw) == "A red ball&cube, see rolling!"


def test_quality_phrase_scales() -> None:
    assert aesthetic_phrase(3.9).endswith("terrible.") and aesthetic_phrase(6.5).endswith("excellent.")
    assert aesthetic_phrase(5.2).endswith("fair.")
    assert motion_phrase(0.2).endswith("very low.") and motion_phrase(25).endswith("extremely high.")
    cfg = CaptionConfig(cfg_dropout=0.0, add_aesthetic_phrase=True, add_motion_phrase=True,
                        add_camera_phrase=True)
    text = build_caption(rec(0, aesthetic=6.0, motion=3.0, camera="pan_left"), cfg, 0, 0)
    assert text == "A cat. aesthetic score: very good. motion strength: fair. camera motion: pan left."
    assert build_caption(rec(0), cfg, 0, 0) == "A cat."  # absent scores add nothing


def test_cfg_dropout_rate_and_determinism() -> None:
    cfg = CaptionConfig()
    assert cfg.cfg_dropout == 0.1
    drops = np.array([build_caption(rec(i), cfg, 7, e) == "" for i in range(2000) for e in range(2)])
    assert 0.08 < drops.mean() < 0.12
    again = np.array([build_caption(rec(i), cfg, 7, e) == "" for i in range(2000) for e in range(2)])
    assert (drops == again).all()  # same (seed, id, epoch) -> same decision (resume, TP/CP peers)
    assert not (drops[0::2] == drops[1::2]).all()  # epochs differ
    assert build_caption(rec(1), CaptionConfig(cfg_dropout=1.0), 0, 0) == ""


def test_list_captions_pick_varies_by_epoch() -> None:
    cfg = CaptionConfig(cfg_dropout=0.0)
    r = rec(5, ("first.", "second.", "third."))
    picks = {build_caption(r, cfg, 1, e) for e in range(30)}
    assert picks == {"first.", "second.", "third."}


def test_tokenize_hook_in_collate() -> None:
    def tok(texts: list[str]) -> dict:
        ids = [[len(w) for w in t.split()][:4] + [0] * (4 - len(t.split()[:4])) for t in texts]
        return {"input_ids": np.array(ids)}

    out = tokenize_captions(["a bb", ""], {"t5": tok, "clip": tok})
    assert out["t5_input_ids"].tolist() == [[1, 2, 0, 0], [0, 0, 0, 0]] and "clip_input_ids" in out
    import torch

    samples = [{"video": torch.zeros(3, 1, 4, 4), "caption": c, "sample_id": i, "shape": (1, 4, 4)}
               for i, c in enumerate(["a bb", "ccc"])]
    batch = collate_samples(samples, {"t5": tok})
    assert batch["video"].shape == (2, 3, 1, 4, 4) and batch["t5_input_ids"].tolist()[1] == [3, 0, 0, 0]
    samples[1]["shape"] = (1, 8, 4)
    with pytest.raises(ValueError, match="mixes shapes"):
        collate_samples(samples)
