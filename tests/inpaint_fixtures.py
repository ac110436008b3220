"""A tiny image-to-video training set-up with online encoding: the generated sample data set, a random tiny
WF-VAE (4 latent channels) and tiny T5 / CLIP text encoders saved to a directory, and configs for the small
preset with the inpainting input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megatron_video.models.wfvae import WFVAEConfig
from tests.data_fixtures import make_sample_dataset
from tests.encoder_fixtures import build_tiny_clip, build_tiny_t5, random_wfvae

LATENT_CHANNELS = 4
TINY_VAE = {"base_channels": 4, "encoder_energy_flow_hidden_size": 4, "decoder_energy_flow_hidden_size": 4,
            "latent_dim": LATENT_CHANNELS, "scale": [1.0] * LATENT_CHANNELS, "shift": [0.0] * LATENT_CHANNELS}


def tiny_vae(seed: int = 0):
    """Random weights with a narrow posterior, as a trained VAE has (std about 0.05 against means spread about
    0.4): training draws its latents from the posterior, and random weights alone give std about 1."""
    vae = random_wfvae(WFVAEConfig(**TINY_VAE), dtype=torch.float32, seed=seed)
    with torch.no_grad():
        vae.encoder.conv_out.conv.bias[LATENT_CHANNELS:] -= 6.0  # the log-variance half of the moments
    return vae


@dataclass(frozen=True)
class I2VSetup:
    model_config: Path
    data_config: Path
    inpaint_config: Path
    vae_path: Path
    vae_config: Path
    t5_path: Path
    clip_path: Path

    def encoder_args(self) -> list[str]:
        return ["--vae-path", str(self.vae_path), "--vae-config", str(self.vae_config), "--t5-path",
                str(self.t5_path), "--clip-path", str(self.clip_path)]


def make_i2v_setup(root: Path, num_frames: int = 17, stages: list[dict] | None = None) -> I2VSetup:
    from safetensors.torch import save_file

    data_dir = make_sample_dataset(root / "data")
    data = {"metadata_paths": [str(data_dir / "data.txt")],
            "shape": {"resolution_mode": "forced", "height": 32, "width": 32, "num_frames": num_frames,
                      "min_num_frames": num_frames, "fps": 8},
            "num_workers": 0}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    model = {"preset": "small", "caption_channels": 16, "pooled_projection_dim": 8,
             "condition_channels": LATENT_CHANNELS + 8}
    (root / "model.yaml").write_text(yaml.safe_dump(model))
    inpaint = {"stages": stages or [{"start": 0, "ratios": {"i2v": 0.5, "continuation": 0.3, "transition": 0.2}}],
               "loss_on": "generated", "masked_latents": "encode"}
    (root / "inpaint.yaml").write_text(yaml.safe_dump(inpaint))
    save_file({k: v.contiguous() for k, v in tiny_vae().state_dict().items()}, str(root / "vae.safetensors"))
    (root / "vae.json").write_text(json.dumps(TINY_VAE))
    return I2VSetup(root / "model.yaml", root / "data.yaml", root / "inpaint.yaml", root / "vae.safetensors",
                    root / "vae.json", build_tiny_t5(root / "t5"), build_tiny_clip(root / "clip", projection_dim=8))
