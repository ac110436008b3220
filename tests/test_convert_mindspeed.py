"""`python -m checkpoints_convert import --from mindspeed-mm|osp-fork`: training checkpoints of MindSpeed-MM and the
Open-Sora Plan fork (synthetic, made to their schemas: tests/mindspeed_fixtures.py) import bitwise, at any TP,
loaded with weights_only=True and without running anything the pickle names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints_convert.mindspeed import (
    MINDSPEED_ATTN_NAMES,
    UpstreamLegacyReader,
    from_mindspeed_key,
    load_foreign_pt,
    to_mindspeed_key,
)
from checkpoints_convert.synthetic import write_random_released
from checkpoints_convert.tensorio import MappedSafetensors
from megatron_video.models.suv_mmdit import suv_config
from tests.mindspeed_fixtures import full_state, write_upstream_checkpoint
from tests.test_convert_roundtrip import assert_same_tensors, cli

CALLS: list[str] = []


def _record(*args: object) -> list[str]:
    CALLS.append(repr(args))
    return CALLS


class _Trap:
    """Pickles as a call of `_record`: unpickling it for real would append to CALLS."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _record, ("unpickled",)


def _released(tmp_path: Path, cfg, last_block_text: bool, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    path = write_random_released(tmp_path / f"released{seed}.safetensors", cfg, last_block_text, seed=seed)
    mapped = MappedSafetensors(path)
    return path, {k: mapped.get(k) for k in mapped.keys()}


def test_mindspeed_names_follow_their_converter() -> None:
    """opensoraplan_converter.py (v1.5) renames attn1 modules only; the mapping is one-to-one both ways."""
    key = "transformer_blocks.3.1.attn1.to_out.0.weight"
    assert to_mindspeed_key(key) == "transformer_blocks.3.1.attn1.proj_out.weight"
    assert to_mindspeed_key("transformer_blocks.0.0.attn1.add_q_proj.bias") == \
        "transformer_blocks.0.0.attn1.added_proj_q.bias"
    assert to_mindspeed_key("transformer_blocks.0.0.ff.net.0.proj.weight") == \
        "transformer_blocks.0.0.ff.net.0.proj.weight"
    for released in MINDSPEED_ATTN_NAMES:
        for leaf in ("weight", "bias", "_extra_state"):
            key = f"transformer_blocks.1.0.attn1.{released}.{leaf}"
            assert from_mindspeed_key(to_mindspeed_key(key)) == key
    assert len(set(MINDSPEED_ATTN_NAMES.values())) == len(MINDSPEED_ATTN_NAMES)


def test_mindspeed_mm_training_checkpoint_imports_bitwise(tmp_path: Path) -> None:
    cfg = suv_config("tiny")
    src, tensors = _released(tmp_path, cfg, last_block_text=False)
    state = full_state(tensors, cfg, extra_state=True, last_block_text=False)
    root = write_upstream_checkpoint(tmp_path / "msmm", {"model": state}, 2, iteration=1200, rename=True)
    assert cli("import", root, tmp_path / "ours", "--from", "mindspeed-mm", "--format", "legacy",
               "--preset", "tiny") == 0
    assert cli("export", tmp_path / "ours", "--safetensors", tmp_path / "back.safetensors") == 0
    assert_same_tensors(src, tmp_path / "back.safetensors")


def test_mindspeed_mm_release_checkpoint_with_its_model_json(tmp_path: Path, capsys) -> None:
    """A converter-written `release` checkpoint (no args, no extra states); the config comes from MindSpeed-MM's
    model JSON (its predictor section), with the unused keys named. (The dist writer behind the default
    `--format dist` is the one test_convert_roundtrip.py covers.)"""
    cfg = suv_config("tiny")
    src, tensors = _released(tmp_path, cfg, last_block_text=False, seed=3)
    state = full_state(tensors, cfg, extra_state=False, last_block_text=False)
    root = write_upstream_checkpoint(tmp_path / "msmm", {"model": state}, 2, iteration=None, rename=True)
    model_json = tmp_path / "pretrain_model.json"
    model_json.write_text(json.dumps({"predictor": {
        "model_id": "SparseUMMDiT", "num_layers": [2, 2, 2], "sparse_n": [1, 2, 1], "double_ff": True,
        "sparse1d": True, "num_heads": 2, "head_dim": 16, "in_channels": 4, "out_channels": 4,
        "timestep_embed_dim": 16, "caption_channels": 24, "pooled_projection_dim": 20, "skip_connection": True,
        "skip_connection_zero_init": True, "dropout": 0.0, "attention_bias": True, "patch_size_thw": [1, 2, 2],
        "activation_fn": "gelu-approximate", "norm_cls": "fp32_layer_norm", "norm_elementwise_affine": True,
        "norm_eps": 1e-06, "dtype": "fp16"}}))
    assert cli("import", root, tmp_path / "ours", "--from", "mindspeed-mm", "--mm-model", model_json,
               "--format", "legacy", "--tp", 2) == 0
    err = capsys.readouterr().err
    assert "predictor.dtype not used" in err and "predictor.norm_elementwise_affine not used" in err
    assert cli("export", tmp_path / "ours", "--preset", "tiny", "--safetensors", tmp_path / "back.safetensors") == 0
    assert_same_tensors(src, tmp_path / "back.safetensors")


def test_fork_checkpoint_model_and_ema(tmp_path: Path) -> None:
    """The fork keeps released names, `._extra_state` entries and the last block's text path; `--weights ema`
    reads its `ema_model`."""
    cfg = suv_config("tiny")
    _, model = _released(tmp_path, cfg, last_block_text=True, seed=1)
    ema_src, ema = _released(tmp_path, cfg, last_block_text=True, seed=2)
    entries = {"model": full_state(model, cfg, True, True), "ema_model": full_state(ema, cfg, True, True)}
    root = write_upstream_checkpoint(tmp_path / "fork", entries, 2, iteration=500, rename=False)
    reader = UpstreamLegacyReader(root, "osp-fork", "model")
    assert reader.iteration == 500 and reader.tp == 2
    assert all(torch.equal(reader.get(k), v) for k, v in model.items())
    assert cli("import", root / "iter_0000500", tmp_path / "ours", "--from", "osp-fork", "--weights", "ema",
               "--format", "legacy", "--preset", "tiny") == 0
    assert cli("export", tmp_path / "ours", "--safetensors", tmp_path / "ema.safetensors") == 0
    assert_same_tensors(ema_src, tmp_path / "ema.safetensors")


def test_nothing_the_pickle_names_runs(tmp_path: Path) -> None:
    """A file whose pickle calls a function on load: the call is bound to an inert stand-in (weights_only)."""
    cfg = suv_config("tiny")
    _, tensors = _released(tmp_path, cfg, last_block_text=False)
    state = full_state(tensors, cfg, extra_state=True, last_block_text=False)
    root = write_upstream_checkpoint(tmp_path / "msmm", {"model": state}, 1, iteration=10, rename=True,
                                     extras={"payload": _Trap()})
    CALLS.clear()
    obj = load_foreign_pt(root / "iter_0000010/mp_rank_00/model_optim_rng.pt")
    assert CALLS == [] and type(obj["payload"]).__name__ == "_record"
    assert type(obj["args"]).__name__ == "Namespace"  # a stand-in, or the real one where torch allowlists it
    assert len(obj["rng_state"][0]["np_rng_state"][1]) == 624  # numpy state: torch's own allowlist reads it
    assert cli("import", root, tmp_path / "ours", "--from", "mindspeed-mm", "--format", "legacy",
               "--preset", "tiny") == 0
    assert CALLS == []


def test_replica_drift_takes_rank0_and_says_so(tmp_path: Path, capsys) -> None:
    cfg = suv_config("tiny")
    _, tensors = _released(tmp_path, cfg, last_block_text=False)
    state = full_state(tensors, cfg, extra_state=True, last_block_text=False)
    root = write_upstream_checkpoint(tmp_path / "msmm", {"model": state}, 2, iteration=10, rename=True)
    rank1 = root / "iter_0000010/mp_rank_01/model_optim_rng.pt"
    obj = torch.load(rank1, weights_only=False)
    obj["model"]["norm_out.norm.weight"] = obj["model"]["norm_out.norm.weight"] + 0.5
    torch.save(obj, rank1)
    reader = UpstreamLegacyReader(root, "mindspeed-mm")
    assert torch.equal(reader.get("norm_out.norm.weight"), tensors["norm_out.norm.weight"])
    assert reader.drift == {"norm_out.norm.weight": pytest.approx(0.5, rel=1e-2)}
    assert cli("import", root, tmp_path / "ours", "--from", "mindspeed-mm", "--format", "legacy",
               "--preset", "tiny") == 0
    assert "norm_out.norm.weight differs between TP ranks" in capsys.readouterr().err


def test_errors_are_clear(tmp_path: Path, capsys) -> None:
    cfg = suv_config("tiny")
    _, tensors = _released(tmp_path, cfg, last_block_text=False)
    state = full_state(tensors, cfg, extra_state=True, last_block_text=False)
    root = write_upstream_checkpoint(tmp_path / "msmm", {"model": state}, 2, iteration=10, rename=True)
    cases = [
        (("--from", "mindspeed-mm", "--weights", "ema"), "MindSpeed-MM keeps no EMA"),
        (("--from", "osp-fork", "--preset", "tiny"), "unknown key"),  # MindSpeed-MM names are not the fork's
        (("--from", "mindspeed-mm", "--preset", "small"), "does not match the model config"),
    ]
    for flags, message in cases:
        assert cli("import", root, tmp_path / "never", *flags) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "never").exists()
    (root / "iter_0000010/mp_rank_01/model_optim_rng.pt").unlink()
    assert cli("import", root, tmp_path / "never", "--from", "mindspeed-mm", "--preset", "tiny") == 2
    assert "missing ['mp_rank_01']" in capsys.readouterr().err
