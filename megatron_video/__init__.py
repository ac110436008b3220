"""megatron-video: a Megatron-core based training stack for video diffusion transformers."""

__version__ = "0.1.0"
