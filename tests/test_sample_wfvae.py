"""tools/sample.py with the real WF-VAE decoder (a tiny random-weight instance built from its config, 4 latent
channels): latents of the right shape, an MP4 of the right frame count and size, and the tool's causal-cache
chunked decode (--vae-chunk-size 1) is the VAE's direct decode of the same latents.

The MP4 is H.264 (yuv420p, crf 18): it must be exactly the MP4 that the same writer makes of the direct decode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.harness import run_distributed
from tests.inpaint_fixtures import LATENT_CHANNELS, TINY_VAE, tiny_vae

MODEL = {"preset": "small", "caption_channels": 16, "pooled_projection_dim": 8, "in_channels": LATENT_CHANNELS,
         "out_channels": LATENT_CHANNELS}
FRAMES, SIZE = 9, 32


def wfvae_worker(root: Path) -> int:
    from safetensors.torch import save_file

    from checkpoints_convert.synthetic import write_random_released
    from megatron_video.models.registry import model_config_from_mapping
    from megatron_video.sampling.cli import main

    (root / "model.yaml").write_text(yaml.safe_dump(MODEL))
    (root / "prompts.txt").write_text("A red circle moves right.\nA blue square moves down.\n")
    save_file({k: v.contiguous() for k, v in tiny_vae().state_dict().items()}, str(root / "vae.safetensors"))
    (root / "vae.json").write_text(json.dumps(TINY_VAE))
    write_random_released(root / "w.safetensors", model_config_from_mapping(MODEL), last_block_text=False,
                          dtype=torch.float32)
    return main(["--device", "cpu", "--model-config", str(root / "model.yaml"), "--prompts", str(root / "prompts.txt"),
                 "--released", str(root / "w.safetensors"), "--encoders", "stub", "--vae-path",
                 str(root / "vae.safetensors"), "--vae-config", str(root / "vae.json"), "--vae-chunk-size", "1",
                 "--num-frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE), "--num-steps", "2",
                 "--guidance-scale", "1", "--fps", "8", "--out", str(root / "out")])


@pytest.mark.slow
def test_sample_tool_decodes_with_the_wfvae(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from megatron_video.sampling.video import read_mp4, to_frames, write_mp4

    (code,) = run_distributed(wfvae_worker, 1, tmp_path, timeout=600)
    assert code == 0
    latents = [load_file(str(tmp_path / "out" / f"sample_{i:04d}.latents.safetensors"))["latents"] for i in (0, 1)]
    assert all(z.shape == (1, LATENT_CHANNELS, (FRAMES - 1) // 8 + 1, SIZE // 8, SIZE // 8) for z in latents)
    vae = tiny_vae()  # the same seed as the saved weights
    with torch.no_grad():
        decoded = [vae.decode(z)[0].float() for z in latents]
        # the tool's decode (chunk_size 1: the causal cache) is the direct one up to float32 summation order:
        # measured 2e-5 at most on values of about [-1, 1], 1.2e-4 (3e-7 relative, a few ulps) where the random
        # VAE decodes the random denoiser's latents to values of about 400
        for z, full in zip(latents, decoded):
            torch.testing.assert_close(vae.decode(z, chunk_size=1)[0].float(), full, rtol=2e-6, atol=1e-4)
    # the MP4 is lossy (H.264, yuv420p) and a random VAE's frames are noise, so it is compared with the same
    # encoder's MP4 of the direct decode: libx264 at fixed settings is deterministic, so they are identical
    references = [read_mp4(write_mp4(tmp_path / f"direct_{i}.mp4", to_frames(v), 8)) for i, v in enumerate(decoded)]
    for i in (0, 1):
        video = read_mp4(tmp_path / "out" / f"sample_{i:04d}.mp4")
        assert video.shape == (FRAMES, SIZE, SIZE, 3)
        np.testing.assert_array_equal(video, references[i])
        assert not np.array_equal(video, references[1 - i]), "two prompts and seeds, two videos"
