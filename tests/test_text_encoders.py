"""T5 / CLIP text encoders from local directories: tokenisation, masks, shapes, dtypes, errors, sharing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_video.models.text_encoders import (
    CLIPTextEncoder,
    T5TextEncoder,
    TextEmbeddings,
    TextEncoders,
    encode_on_subset,
)

from .encoder_fixtures import SAMPLE_CAPTIONS, build_tiny_clip, build_tiny_t5

T5_DIM, CLIP_DIM = 16, 24


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_encoders")
    return {"t5": build_tiny_t5(root / "t5", d_model=T5_DIM),
            "clip": build_tiny_clip(root / "clip", projection_dim=CLIP_DIM),
            "clip_full": build_tiny_clip(root / "clip_full", full_model=True, projection_dim=CLIP_DIM)}


@pytest.fixture(scope="module")
def encoders(model_dirs: dict[str, Path]) -> TextEncoders:
    return TextEncoders.from_pretrained(model_dirs["t5"], model_dirs["clip"], dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_masks_and_dtypes(model_dirs: dict[str, Path], dtype: torch.dtype) -> None:
    enc = TextEncoders.from_pretrained(model_dirs["t5"], model_dirs["clip"], dtype=dtype)
    captions = SAMPLE_CAPTIONS[:3]
    emb = enc.encode(captions)
    assert emb.t5_hidden.shape == (3, 512, T5_DIM) and emb.t5_hidden.dtype == dtype
    assert emb.t5_mask.shape == (3, 512) and emb.t5_mask.dtype == torch.int64
    assert emb.clip_pooled.shape == (3, CLIP_DIM) and emb.clip_pooled.dtype == dtype
    assert torch.isfinite(emb.t5_hidden.float()).all() and torch.isfinite(emb.clip_pooled.float()).all()
    # The mask covers exactly the caption's tokens plus </s>, left-aligned.
    ids, _ = enc.t5.tokenize(captions)
    for i, cap in enumerate(captions):
        n = len(enc.t5.tokenizer(cap).input_ids)
        assert emb.t5_mask[i, :n].all() and not emb.t5_mask[i, n:].any()
        assert (ids[i, n:] == enc.t5.tokenizer.pad_token_id).all()
    for m in (enc.t5.model, enc.clip.model):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        assert next(m.parameters()).dtype == dtype


def test_tokenisation_lengths_and_truncation(encoders: TextEncoders) -> None:
    long_caption = " ".join(SAMPLE_CAPTIONS * 20)
    t5_ids, t5_mask = encoders.t5.tokenize(["a cat", long_caption])
    clip_ids, clip_mask = encoders.clip.tokenize(["a cat", long_caption])
    assert t5_ids.shape == (2, 512) and clip_ids.shape == (2, 77)
    assert t5_mask[1].all() and clip_mask[1].all()  # truncated to the full length
    assert t5_ids[1, -1] == encoders.t5.tokenizer.eos_token_id
    assert 0 < t5_mask[0].sum() < 10 and 0 < clip_mask[0].sum() < 10
    assert clip_ids[0, 0] == encoders.clip.tokenizer.bos_token_id


def test_batched_equals_single(encoders: TextEncoders) -> None:
    captions = SAMPLE_CAPTIONS[:5]
    whole = encoders.encode(captions)
    micro = TextEncoders(encoders.t5, encoders.clip, batch_size=2).encode(captions)
    one = encoders.encode(captions[3:4])
    hidden, mask, pooled = whole
    assert hidden is whole.t5_hidden and mask is whole.t5_mask and pooled is whole.clip_pooled
    for a, b in zip((whole.t5_hidden, whole.t5_mask, whole.clip_pooled),
                    (micro.t5_hidden, micro.t5_mask, micro.clip_pooled)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole.clip_pooled[3:4], one.clip_pooled, rtol=0, atol=1e-5)
    assert not torch.allclose(whole.clip_pooled[0], whole.clip_pooled[1])


def test_clip_pooled_is_projected_eos_state(encoders: TextEncoders) -> None:
    ids, _ = encoders.clip.tokenize(["a cat sits on a red mat"])
    model = encoders.clip.model
    with torch.no_grad():
        hidden = model.text_model(input_ids=ids).last_hidden_state
        eos = (ids[0] == encoders.clip.tokenizer.eos_token_id).nonzero()[0, 0]
        expected = model.text_projection(hidden[0, eos])
    torch.testing.assert_close(encoders.clip(["a cat sits on a red mat"])[0], expected, rtol=0, atol=1e-5)


def test_full_clip_directory_loads_text_weights(model_dirs: dict[str, Path]) -> None:
    from transformers import CLIPModel

    enc = CLIPTextEncoder(model_dirs["clip_full"], dtype=torch.float32)
    full = CLIPModel.from_pretrained(str(model_dirs["clip_full"])).eval()
    ids, mask = enc.tokenize(["two dogs run"])
    with torch.no_grad():
        pooled = full.text_model(input_ids=ids, attention_mask=mask).pooler_output
        expected = full.text_projection(pooled)
    torch.testing.assert_close(enc(["two dogs run"]), expected, rtol=0, atol=1e-5)


def test_clear_errors(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        T5TextEncoder(tmp_path / "nope")
    with pytest.raises(ValueError, match="model_type 'clip_text_model'"):
        T5TextEncoder(model_dirs["clip"])
    with pytest.raises(ValueError, match="model_type 't5'"):
        TextEncoders.from_pretrained(model_dirs["t5"], model_dirs["t5"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPTextEncoder(empty)
    with pytest.raises(ValueError, match="dtype"):
        T5TextEncoder(model_dirs["t5"], dtype=torch.float64)
    # A directory whose weights do not fit its config is refused, not left randomly initialised.
    broken = tmp_path / "broken_t5"
    shutil.copytree(model_dirs["t5"], broken)
    (broken / "model.safetensors").unlink()
    from safetensors.torch import save_file

    save_file({"shared.weight": torch.zeros(3, 3)}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError)):
        T5TextEncoder(broken)
    cfg = json.loads((model_dirs["t5"] / "config.json").read_text())
    assert cfg["model_type"] == "t5"


def test_bad_captions(encoders: TextEncoders) -> None:
    for bad in ([], "a cat", ["ok", 3]):
        with pytest.raises(ValueError, match="captions"):
            encoders.encode(bad)  # type: ignore[arg-type]


def _share_worker(t5_dir: str, clip_dir: str, captions: list[str]) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    rank = dist.get_rank()
    # Ranks 1 and 2 form one model replica; rank 1 encodes, rank 2 receives. Rank 0 is in another group.
    groups = [dist.new_group([0]), dist.new_group([1, 2])]
    group = groups[0] if rank == 0 else groups[1]
    src = 0 if rank == 0 else 1
    encoders = None
    if rank == src:
        encoders = TextEncoders.from_pretrained(t5_dir, clip_dir, dtype=torch.bfloat16)
    emb: TextEmbeddings = encode_on_subset(encoders, captions if rank == src else None, group, src)
    return {"t5": emb.t5_hidden, "mask": emb.t5_mask, "clip": emb.clip_pooled}


@pytest.mark.slow
def test_encode_on_subset_broadcasts_within_group(model_dirs: dict[str, Path]) -> None:
    from .harness import run_distributed

    captions = SAMPLE_CAPTIONS[:2]
    out = run_distributed(_share_worker, 3, str(model_dirs["t5"]), str(model_dirs["clip"]), captions,
                          timeout=240)
    local = TextEncoders.from_pretrained(model_dirs["t5"], model_dirs["clip"], dtype=torch.bfloat16)
    ref = local.encode(captions)
    for key, expected in (("t5", ref.t5_hidden), ("mask", ref.t5_mask), ("clip", ref.clip_pooled)):
        assert torch.equal(out[1][key], out[2][key]), key
        assert torch.equal(out[0][key], out[1][key]), key  # same encoders, same captions
        torch.testing.assert_close(out[2][key], expected, rtol=0, atol=2e-2)
    assert out[2]["t5"].dtype == torch.bfloat16 and out[2]["t5"].shape == (2, 512, T5_DIM)
