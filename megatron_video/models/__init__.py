"""Models: `suv_mmdit` (the Open-Sora Plan v1.5 denoiser), `wfvae` (the video VAE), and the shared
attention kernel (`attention`). Subpackages are imported explicitly by their users."""
