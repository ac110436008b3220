"""A checkpoint never runs code: hostile pickles in `.metadata`, in a byte entry (a ShardedObject) or in
`common.pt` are refused by every entry point that reads a checkpoint, with one message, exit code 2, and the
payload (it would create a marker directory) never runs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_video.training.checkpoint_safety import CheckpointRefused, verify_dist_checkpoint

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Harmless stand-in for an exploit: unpickling it creates the directory `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _write(root: Path, marker: Path, where: str | None) -> Path:
    """A one-tensor dist checkpoint (iteration 1) under `root`, with the payload in `where`."""
    from megatron.core.dist_checkpointing import ShardedObject

    from checkpoints_convert.ours import FINETUNE_COMMON, ensure_process_group, write_dist

    ensure_process_group()
    if where == "bytes":  # saved like the per-rank RNG state, which the loader requests back
        from megatron.core import dist_checkpointing

        from megatron_video.training.checkpointing import fresh_tmp_dir, publish_checkpoint

        tmp = fresh_tmp_dir(root, 1)
        state = {"rng_state": ShardedObject("rng_state.world1", Payload(marker), (1,), (0,), replica_id=0),
                 "common": {**FINETUNE_COMMON, "has_rng_state": True}}
        dist_checkpointing.save(state, str(tmp))
        return publish_checkpoint(root, 1, tmp)
    common = {**FINETUNE_COMMON, "x": Payload(marker)} if where == "common" else None
    directory = write_dist(root, 1, {"w": torch.ones(2, 3)}, common=common)
    if where == "metadata":
        with open(directory / ".metadata", "rb") as handle:
            metadata = pickle.load(handle)
        metadata.mcore_data = {"x": Payload(marker)}
        with open(directory / ".metadata", "wb") as handle:
            pickle.dump(metadata, handle)
    return directory


@pytest.mark.parametrize("where,file", [("metadata", ".metadata"), ("bytes", "__0_0.distcp"),
                                        ("common", "common.pt")])
def test_hostile_pickle_is_refused(tmp_path: Path, where: str, file: str):
    marker = tmp_path / "pwned"
    directory = _write(tmp_path / "ckpt", marker, where)
    with pytest.raises(CheckpointRefused, match=f"refusing to load {directory / file}"):
        verify_dist_checkpoint(directory)
    assert not marker.exists()


def test_genuine_checkpoint_passes(tmp_path: Path):
    verify_dist_checkpoint(_write(tmp_path / "ckpt", tmp_path / "pwned", None))


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_every_entry_point_refuses(tmp_path: Path):
    marker = tmp_path / "pwned"
    root = tmp_path / "ckpt"
    _write(root, marker, "bytes")
    model, data = tmp_path / "model.yaml", tmp_path / "data.yaml"
    model.write_text(yaml.safe_dump({"preset": "tiny"}))
    data.write_text(yaml.safe_dump({"metadata_paths": [str(tmp_path / "data.txt")]}))
    train = ["--device", "cpu", "--model-config", str(model), "--data-config", str(data), "--train-iters", "1",
             "--global-batch-size", "1", "--micro-batch-size", "1"]
    runs = {
        "--load": _run("pretrain_t2v.py", *train, "--load", str(root)),
        "--finetune": _run("pretrain_t2v.py", *train, "--load", str(root), "--finetune"),
        "--init-from-t2v": _run("pretrain_i2v.py", *train, "--inpaint-config", str(tmp_path / "inpaint.yaml"),
                                "--init-from-t2v", str(root)),
        "export": _run("-m", "checkpoints_convert", "export", str(root), "--preset", "tiny", "--safetensors",
                       str(tmp_path / "out.safetensors")),
        "control --base": _run("pretrain_control.py", *train, "--structure-signal", "canny", "--base", str(root)),
        "export_control": _run("tools/export_control.py", str(root), "--out", str(tmp_path / "c.safetensors")),
    }
    for name, run in runs.items():
        output = run.stdout + run.stderr
        assert run.returncode == 2, (name, output[-3000:])
        assert output.count("refusing to load") == 1 and str(root / "iter_0000001" / "__0_0.distcp") in output, \
            (name, output[-3000:])
        assert "Traceback" not in output, (name, output[-3000:])
    assert not marker.exists()
