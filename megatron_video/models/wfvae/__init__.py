"""Open-Sora Plan v1.5 WF-VAE (8x8x8, 32 latent channels) with causal-cache chunked encode/decode."""

from megatron_video.models.wfvae.cache import CausalState
from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.loading import check_state_dict, extract_state_dict, load_wfvae
from megatron_video.models.wfvae.model import WFVAE, DiagonalGaussian, check_video_shape, latent_shape

__all__ = [
    "WFVAE",
    "CausalState",
    "DiagonalGaussian",
    "WFVAEConfig",
    "check_state_dict",
    "check_video_shape",
    "extract_state_dict",
    "latent_shape",
    "load_wfvae",
]
