"""Cutting a global batch's T5 padding (training/data.py `trim_text_padding`): one length per global batch, the
last text position any caption uses, and the same video output as the padded, masked text."""

from __future__ import annotations

import torch

from tests.cp_fixtures import make_inputs


def _micro_batch(lengths: list[int], text_len: int = 12, dim: int = 3) -> dict:
    mask = torch.zeros(len(lengths), text_len, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    hidden = torch.randn(len(lengths), text_len, dim) * mask[..., None]
    return {"t5_hidden": hidden, "t5_mask": mask.clone(), "t5_all_valid": bool(mask.all()), "t5_mask_host": mask}


def test_one_length_per_global_batch():
    from megatron_video.training.data import trim_text_padding

    batches = [_micro_batch([3, 5]), _micro_batch([7, 7]), _micro_batch([2, 1])]
    before = [mb["t5_hidden"].clone() for mb in batches]
    trim_text_padding(batches)
    assert [tuple(mb["t5_hidden"].shape) for mb in batches] == [(2, 7, 3)] * 3
    assert [tuple(mb["t5_mask"].shape) for mb in batches] == [(2, 7)] * 3
    assert [mb["t5_all_valid"] for mb in batches] == [False, True, False]  # only the second fills 7 positions
    for mb, full in zip(batches, before):
        assert torch.equal(mb["t5_hidden"], full[:, :7]) and not full[:, 7:].any()  # only padding was cut


def test_nothing_is_cut_without_host_masks():
    """A micro-batch whose text was encoded online has no host mask: the global batch keeps its length (every
    rank of the replica decides alike from the same micro-batches)."""
    from megatron_video.training.data import trim_text_padding

    batches = [_micro_batch([3, 5]), {**_micro_batch([2, 2]), "t5_mask_host": None}]
    trim_text_padding(batches)
    assert [mb["t5_hidden"].shape[1] for mb in batches] == [12, 12]
    empty = [_micro_batch([0, 0])]  # no caption uses any position: one position stays
    trim_text_padding(empty)
    assert empty[0]["t5_hidden"].shape[1] == 1 and empty[0]["t5_all_valid"] is False


def test_cut_text_gives_the_same_video_output(tp1):
    """The small preset (skiparse k = 2 and 4) on padded text with its mask and on the text cut to the longest
    caption: the same output to 1e-5 of its scale (fp32; only the kernels' reduction order can differ), and
    without any text mask when the cut text is all valid."""
    from megatron_video.models.suv_mmdit import SUVMMDiT, megatron_config, suv_config

    cfg = suv_config("small")
    model = SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True), init_seed=3)
    batch = make_inputs(cfg, (3, 6, 4))
    batch.pop("target")
    batch["attention_mask"] = None
    text, mask = batch["encoder_hidden_states"], batch["encoder_attention_mask"]
    text_len = text.shape[2]
    padded = {**batch, "encoder_hidden_states": torch.cat([text, torch.randn_like(text)], 2),
              "encoder_attention_mask": torch.cat([mask, torch.zeros_like(mask)], 2)}  # 7 more masked positions
    with torch.no_grad():
        reference = model(**padded)
        cut = model(**batch)
        full = model(**{**batch, "encoder_hidden_states": text[:1], "encoder_attention_mask": None,
                        "hidden_states": batch["hidden_states"][:1], "timestep": batch["timestep"][:1],
                        "pooled_projections": batch["pooled_projections"][:1]})
        full_masked = model(**{**padded, "hidden_states": padded["hidden_states"][:1],
                               "timestep": padded["timestep"][:1],
                               "pooled_projections": padded["pooled_projections"][:1],
                               "encoder_hidden_states": padded["encoder_hidden_states"][:1],
                               "encoder_attention_mask": padded["encoder_attention_mask"][:1]})
    assert text_len == 7 and reference.abs().max() > 0.1
    scale = reference.abs().max()
    assert (cut - reference).abs().max() <= 1e-5 * scale
    assert (full - full_masked).abs().max() <= 1e-5 * full_masked.abs().max()  # sample 0 fills 7: no mask at all
