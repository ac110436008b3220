"""tools/sample.py: the same weights as a released file and as our checkpoint give the same video; bad inputs are
one clear message and exit code 2 before any weights load."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml

from tests.harness import run_distributed

MODEL = {"preset": "small", "caption_channels": 16, "pooled_projection_dim": 8, "in_channels": 48, "out_channels": 48}
PROMPTS = "A red circle moves left to right across a black background.\nA blue square on navy.\n"


def _files(root: Path, **model_overrides) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.yaml").write_text(yaml.safe_dump({**MODEL, **model_overrides}))
    (root / "prompts.txt").write_text(PROMPTS)
    return {"model": root / "model.yaml", "prompts": root / "prompts.txt"}


def _argv(files: dict[str, Path], *extra: str, vae: tuple[str, ...] = ("--stand-in-vae", "4")) -> list[str]:
    return ["--device", "cpu", "--model-config", str(files["model"]), "--prompts", str(files["prompts"]),
            "--encoders", "stub", *vae, "--num-frames", "9", "--height", "32", "--width", "32",
            "--num-steps", "2", "--guidance-scale", "3", "--fps", "8", *extra]


def _main(argv: list[str]) -> tuple[int, str]:
    from megatron_video.sampling.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def both_formats_worker(root: Path) -> dict:
    from checkpoints_convert.cli import main as convert
    from checkpoints_convert.synthetic import write_random_released
    from megatron_video.models.registry import model_config_from_mapping

    files = _files(root)
    cfg = model_config_from_mapping(MODEL)
    # random weights without the last block's text modules (this config does not build them)
    write_random_released(root / "w.safetensors", cfg, last_block_text=False, dtype=torch.float32)
    assert convert(["import", str(root / "w.safetensors"), str(root / "ckpt"), "--model-config",
                    str(files["model"])]) == 0
    released = _main(_argv(files, "--released", str(root / "w.safetensors"), "--out", str(root / "released")))
    ours = _main(_argv(files, "--load", str(root / "ckpt"), "--weights", "model", "--out", str(root / "ours")))
    other = _files(root / "other", num_layers=[2, 2, 1, 2, 2])
    wrong = _main(_argv(other, "--load", str(root / "ckpt"), "--weights", "model", "--out", str(root / "x")))
    no_ema = _main(_argv(files, "--load", str(root / "ckpt"), "--weights", "ema", "--out", str(root / "x")))
    return {"released": released, "ours": ours, "wrong": wrong, "no_ema": no_ema}


@pytest.mark.slow
def test_released_and_our_checkpoint_give_the_same_video(tmp_path: Path):
    from safetensors.torch import load_file

    from megatron_video.sampling.video import read_mp4

    (result,) = run_distributed(both_formats_worker, 1, tmp_path, timeout=600)
    assert result["released"][0] == 0 and result["ours"][0] == 0, result
    for i in range(2):
        a = load_file(str(tmp_path / "released" / f"sample_{i:04d}.latents.safetensors"))["latents"]
        b = load_file(str(tmp_path / "ours" / f"sample_{i:04d}.latents.safetensors"))["latents"]
        assert torch.equal(a, b) and a.shape == (1, 48, 9, 8, 8)
        frames = read_mp4(tmp_path / "ours" / f"sample_{i:04d}.mp4")
        assert frames.shape == (9, 32, 32, 3)
        assert (frames == read_mp4(tmp_path / "released" / f"sample_{i:04d}.mp4")).all()
    a0 = load_file(str(tmp_path / "ours" / "sample_0000.latents.safetensors"))["latents"]
    assert not torch.equal(a0, b), "two prompts and seeds, two samples"
    code, message = result["wrong"]
    assert code == 2 and "not a checkpoint of this model config" in message and "Traceback" not in message
    code, message = result["no_ema"]
    assert code == 2 and "ema weights" in message
    assert not (tmp_path / "x").exists(), "nothing is written for a bad input"


@pytest.mark.parametrize("extra, message", [
    (["--num-frames", "10", "WFVAE"], "--num-frames 10: the VAE needs 8n+1 frames"),
    (["--height", "36"], "--height 36 is not a multiple of VAE factor x patch = 4 x 2 = 8"),
    (["--stand-in-vae", "2"], "the VAE gives 12 latent channels, the model config takes 48"),
    (["--task", "i2v"], "needs an inpainting model"),
])
def test_bad_inputs_fail_before_loading(tmp_path: Path, extra: list[str], message: str):
    files = _files(tmp_path)
    vae = ("--stand-in-vae", "4")
    if "WFVAE" in extra:  # the WF-VAE's factors (8 x 8 x 8); its weights are never read
        (tmp_path / "vae.ckpt").write_bytes(b"")
        extra, vae = [e for e in extra if e != "WFVAE"], ("--vae-path", str(tmp_path / "vae.ckpt"))
    code, err = _main(_argv(files, "--load", str(tmp_path), "--out", str(tmp_path / "o"), *extra, vae=vae))
    assert code == 2 and message in err and "Traceback" not in err, err


def test_inpainting_task_with_the_stand_in_vae_refused(tmp_path: Path):
    """The inpainting masks fold frames by the WF-VAE's temporal stride; the space-to-depth stand-in keeps every
    frame, so an i2v request with it is refused up front (it used to fail inside the mask folding)."""
    files = _files(tmp_path, condition_channels=48 + 8)
    (tmp_path / "first.png").write_bytes(b"")
    code, err = _main(_argv(files, "--load", str(tmp_path), "--out", str(tmp_path / "o"), "--task", "i2v",
                            "--cond-video", str(tmp_path / "first.png")))
    assert code == 2 and "needs the WF-VAE (--vae-path)" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_missing_prompt_file_and_too_many_negative_prompts(tmp_path: Path):
    files = _files(tmp_path)
    code, err = _main(_argv({**files, "prompts": tmp_path / "nope.txt"}, "--load", str(tmp_path), "--out", "o"))
    assert code == 2 and "--prompts: file not found" in err
    (tmp_path / "neg.txt").write_text("blurry\nugly\nstatic\n")
    code, err = _main(_argv(files, "--load", str(tmp_path), "--negative-prompts", str(tmp_path / "neg.txt"),
                            "--out", "o"))
    assert code == 2 and "3 guidance (negative) prompts for 2 samples" in err
