"""Bitwise round trips through the converter CLI (released -> legacy TP x PP / dist -> reshard -> released),
the file layouts it writes, and its strict errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints_convert.cli import main
from checkpoints_convert.schema import last_block_text_keys, released_schema
from checkpoints_convert.synthetic import write_random_released
from checkpoints_convert.tensorio import MappedSafetensors
from megatron_video.models.suv_mmdit import suv_config

REPO = Path(__file__).resolve().parents[1]


def assert_same_tensors(a: Path, b: Path, skip: set[str] = frozenset()) -> None:
    """Two safetensors files (or a file and a diffusers folder) hold bitwise equal tensors."""
    x = MappedSafetensors(a)
    files = sorted(b.glob("*.safetensors")) if b.is_dir() else [b]
    ys = [MappedSafetensors(f) for f in files]
    y_keys = {k: y for y in ys for k in y.keys()}
    assert set(x.keys()) - skip == set(y_keys) - skip
    for key in x.keys():
        if key not in skip:
            assert x.dtype(key) == y_keys[key].dtype(key), key
            assert torch.equal(x.get(key), y_keys[key].get(key)), key


def cli(*argv: object) -> int:
    return main([str(a) for a in argv])


def test_legacy_tp2_pp2_round_trip(tmp_path: Path) -> None:
    cfg = suv_config("small")
    src = write_random_released(tmp_path / "src.safetensors", cfg, pt=tmp_path / "src.pt")
    assert cli("import", tmp_path / "src.pt", tmp_path / "leg", "--format", "legacy", "--tp", 2, "--pp", 2,
               "--preset", "small", "--iteration", 7) == 0
    assert (tmp_path / "leg/latest_checkpointed_iteration.txt").read_text().strip() == "7"
    rank = torch.load(tmp_path / "leg/iter_0000007/mp_rank_01_001/model_optim_rng.pt", weights_only=True)
    model = rank["model"]
    assert rank["layout"] == {"tp": 2, "pp": 2, "tp_rank": 1, "pp_rank": 1, "blocks": [5, 10]}
    full = MappedSafetensors(src)
    q = "transformer_blocks.4.1.attn1.to_q.weight"  # block 9: pipeline stage 1
    assert torch.equal(model[q], full.get(q)[32:])
    out = "transformer_blocks.4.1.attn1.to_out.0.weight"
    assert torch.equal(model[out], full.get(out)[:, 32:])
    assert "transformer_blocks.0.0.attn1.to_q.weight" not in model and "proj_out.weight" in model
    assert model["transformer_blocks.4.1.attn1.to_q._extra_state"] is None

    assert cli("export", tmp_path / "leg", "--safetensors", tmp_path / "out.safetensors", "--pt", tmp_path / "out.pt",
               "--diffusers", tmp_path / "diff", "--max-shard-size", "200KB") == 0
    assert_same_tensors(src, tmp_path / "out.safetensors")
    assert_same_tensors(src, tmp_path / "diff")
    index = json.loads((tmp_path / "diff/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(full.keys())
    assert json.loads((tmp_path / "diff/config.json").read_text())["num_layers"] == list(cfg.num_layers)
    before = torch.load(tmp_path / "src.pt", weights_only=True)
    after = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(after) == list(before)  # same entries (None extra states included) in the same order
    assert all(after[k] is None if v is None else torch.equal(after[k], v) for k, v in before.items())


def test_reshard_tp2_to_tp4_round_trip(tmp_path: Path) -> None:
    cfg = suv_config("small")
    src = write_random_released(tmp_path / "src.safetensors", cfg, last_block_text=False, dtype=torch.float32)
    assert cli("import", src, tmp_path / "tp2", "--format", "legacy", "--tp", 2, "--preset", "small") == 0
    assert cli("reshard", tmp_path / "tp2", tmp_path / "tp4", "--tp", 4, "--pp", 3) == 0
    names = sorted(p.name for p in (tmp_path / "tp4/iter_0000000").iterdir())
    assert names == [f"mp_rank_{t:02d}_{p:03d}" for t in range(4) for p in range(3)]
    assert cli("export", tmp_path / "tp4", "--safetensors", tmp_path / "out.safetensors") == 0
    assert_same_tensors(src, tmp_path / "out.safetensors")
    # the released layout: last-block text modules added (zeros: they never reach the output)
    assert cli("export", tmp_path / "tp4", "--safetensors", tmp_path / "with.safetensors",
               "--last-block-text", "include") == 0
    text = set(last_block_text_keys(cfg))
    assert_same_tensors(src, tmp_path / "with.safetensors", skip=text)
    withtext = MappedSafetensors(tmp_path / "with.safetensors")
    assert set(withtext.keys()) == {k for k, s in released_schema(cfg).items() if s is not None}
    assert not withtext.get("transformer_blocks.4.1.ff_enc.net.2.weight").any()


def test_dist_round_trip_from_diffusers_folder(tmp_path: Path) -> None:
    from checkpoints_convert.convert import write_diffusers

    cfg = suv_config("small")
    src = write_random_released(tmp_path / "src.safetensors", cfg)
    mapped = MappedSafetensors(src)
    write_diffusers(mapped, mapped.keys(), cfg, tmp_path / "folder", max_shard_bytes=100_000)
    assert cli("import", tmp_path / "folder", tmp_path / "dist") == 0  # config from the folder's config.json
    assert cli("export", tmp_path / "dist", "--preset", "small", "--safetensors", tmp_path / "out.safetensors") == 0
    assert_same_tensors(src, tmp_path / "out.safetensors")
    # a folder whose config.json disagrees with the given preset
    assert cli("import", tmp_path / "folder", tmp_path / "bad", "--preset", "tiny") == 2


def test_export_ema_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from checkpoints_convert.ours import write_dist
    from megatron_video.models.suv_mmdit.state_dict_adapter import from_released

    cfg = suv_config("tiny")
    src = write_random_released(tmp_path / "src.safetensors", cfg, last_block_text=False)
    mapped = MappedSafetensors(src)
    write_dist(tmp_path / "ckpt", 3, from_released({k: mapped.get(k) for k in mapped.keys()}, cfg), prefix="ema.")
    assert cli("export", tmp_path / "ckpt", "--preset", "tiny", "--weights", "ema", "--safetensors",
               tmp_path / "ema.safetensors") == 0
    assert_same_tensors(src, tmp_path / "ema.safetensors")
    assert cli("export", tmp_path / "ckpt", "--preset", "tiny", "--pt", tmp_path / "m.pt") == 2
    assert "no tensors under 'model.'" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("unknown", "unknown key"), ("missing", "missing key"), ("shape", "shape mismatch"),
    ("config", "does not match the model config"), ("tp3", "TP size 3 does not divide"),
    ("heads", "number of attention heads"), ("pp", "exceeds the number of blocks"),
    ("dist_tp", "layout-free"), ("prefix", "no key starts with the prefix"),
])
def test_import_errors(tmp_path: Path, capsys: pytest.CaptureFixture, case: str, message: str) -> None:
    from safetensors.torch import save_file

    cfg = suv_config("small")
    src = MappedSafetensors(write_random_released(tmp_path / "src.safetensors", cfg))
    weights = {k: src.get(k).clone() for k in src.keys()}
    args = ["--format", "legacy", "--preset", "small"]
    if case == "unknown":
        weights["transformer_blocks.0.0.attn1.extra.weight"] = torch.zeros(2)
    elif case == "missing":
        del weights["norm_final.bias"]
    elif case == "shape":
        weights["proj_out.weight"] = weights["proj_out.weight"][:, :-1].contiguous()
    elif case == "config":
        args[-1] = "tiny"
    elif case == "tp3":
        args += ["--tp", "3"]
    elif case == "heads":
        args += ["--tp", "8"]  # 64 hidden divide by 8, the 4 heads do not
    elif case == "pp":
        args += ["--pp", "11"]
    elif case == "dist_tp":
        args = ["--tp", "2", "--preset", "small"]
    elif case == "prefix":
        args += ["--prefix", "state_dict."]
    save_file(weights, tmp_path / "w.safetensors")
    assert cli("import", tmp_path / "w.safetensors", tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("iter_*"))


def test_reshard_of_dist_checkpoint_explains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_random_released(tmp_path / "src.safetensors", suv_config("tiny"))
    assert cli("import", src, tmp_path / "dist", "--preset", "tiny") == 0
    assert cli("reshard", tmp_path / "dist", tmp_path / "out", "--tp", 2, "--preset", "tiny") == 2
    err = capsys.readouterr().err
    assert "needs no resharding" in err and "loads at any TP x PP" in err


@pytest.mark.slow
def test_module_entry_point(tmp_path: Path) -> None:
    """`python -m checkpoints_convert` runs the CLI and exits 2 with a message on bad input."""
    run = subprocess.run([sys.executable, "-m", "checkpoints_convert", "import", str(tmp_path / "absent.pt"),
                          str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "released weights not found" in run.stderr


@pytest.mark.slow
def test_full_width_round_trip(tmp_path: Path) -> None:
    """The 8.5B schema at full width (hidden 3072, FFN 12288, 6·3072 modulation, caption 2048, ...) with 3 of
    the 32 blocks (one per stage of a 3-stage U), bf16 random weights: legacy TP 2 x PP 2 -> reshard TP 4 ->
    export, bitwise (the dist format's import -> export runs at small width in the tests above). The full 32
    blocks run in bench/bench_convert.py."""
    cfg = suv_config("osp-v1.5-8.5b", num_layers=(1, 1, 1), sparse_n=(1, 2, 1))
    src = write_random_released(tmp_path / "src.safetensors", cfg, fast=True)
    common = ["--model-config", _config_file(tmp_path)]
    assert cli("import", src, tmp_path / "leg", "--format", "legacy", "--tp", 2, "--pp", 2, *common) == 0
    assert cli("reshard", tmp_path / "leg", tmp_path / "tp4", "--tp", 4) == 0
    shutil.rmtree(tmp_path / "leg")  # each full-width copy is GBs; keep at most three on disk
    assert cli("export", tmp_path / "tp4", "--safetensors", tmp_path / "out.safetensors") == 0
    shutil.rmtree(tmp_path / "tp4")
    assert_same_tensors(src, tmp_path / "out.safetensors")


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text("preset: osp-v1.5-8.5b\nnum_layers: [1, 1, 1]\nsparse_n: [1, 2, 1]\n")
    return path
