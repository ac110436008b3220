"""WF-VAE configuration: the released Open-Sora Plan v1.5 8x8x8 / 32-channel model and a tiny test variant."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# Per-channel latent normalisation of the released model: latent = (sample - shift) * scale.
RELEASED_SCALE: tuple[float, ...] = (
    0.7031, 0.7109, 1.5391, 1.2969, 0.7109, 1.4141, 1.3828, 2.1719,
    1.7266, 1.8281, 1.9141, 1.2031, 0.6875, 0.9609, 1.6484, 1.1875,
    1.5312, 1.1328, 0.8828, 0.6836, 0.8828, 0.9219, 1.6953, 1.4453,
    1.5312, 0.6836, 0.7656, 0.8242, 1.2344, 1.0312, 1.7266, 0.9492,
)  # fmt: skip
RELEASED_SHIFT: tuple[float, ...] = (
    -0.2129, 0.1226, 1.6328, 0.6211, -0.8750, 0.6172, -0.5703, 0.1348,
    -0.2178, -0.9375, 0.3184, 0.3281, -0.0544, -0.1826, -0.2812, 0.4355,
    0.1621, -0.2578, 0.7148, -0.7422, -0.2295, -0.2324, -1.4922, 0.6328,
    1.1250, -0.2578, -2.1094, 1.0391, 1.1797, -1.2422, -0.2988, -0.9570,
)  # fmt: skip

# Upstream config values this implementation supports (anything else is rejected, not silently ignored).
_FIXED_UPSTREAM_VALUES: dict[str, tuple[Any, ...]] = {
    "model_id": ("wfvae",),
    "norm_type": ("layernorm", "aelayernorm"),
    "t_interpolation": ("trilinear",),
    "l1_dowmsample_block": ("Spatial2xTime2x3DDownsample",),
    "l2_dowmsample_block": ("Spatial2xTime2x3DDownsample",),
    "l1_downsample_wavelet": ("HaarWaveletTransform3D",),
    "l2_downsample_wavelet": ("HaarWaveletTransform3D",),
    "l1_upsample_block": ("Spatial2xTime2x3DUpsample",),
    "l2_upsample_block": ("Spatial2xTime2x3DUpsample",),
    "l1_upsample_wavelet": ("InverseHaarWaveletTransform3D",),
    "l2_upsample_wavelet": ("InverseHaarWaveletTransform3D",),
    "vae_scale_factor": ([8, 8, 8], (8, 8, 8)),
}
# Upstream keys that only steer upstream runtime behaviour (tiling, dtype) and are handled by our API instead.
_IGNORED_UPSTREAM_KEYS = {"use_tiling", "dtype", "t_chunk_enc", "t_chunk_dec", "from_pretrained"}


@dataclass(frozen=True)
class WFVAEConfig:
    """Architecture of the 8x8x8 WF-VAE (names follow the upstream "ae" config section)."""

    base_channels: int = 160
    latent_dim: int = 32
    encoder_num_resblocks: int = 2
    decoder_num_resblocks: int = 2
    encoder_energy_flow_hidden_size: int = 128
    decoder_energy_flow_hidden_size: int = 128
    connect_res_layer_num: int = 1
    use_attention: bool = True
    dropout: float = 0.0
    scale: tuple[float, ...] = field(default=RELEASED_SCALE)
    shift: tuple[float, ...] = field(default=RELEASED_SHIFT)

    def __post_init__(self) -> None:
        for name in ("base_channels", "latent_dim", "encoder_energy_flow_hidden_size",
                     "decoder_energy_flow_hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WFVAEConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("encoder_num_resblocks", "decoder_num_resblocks", "connect_res_layer_num"):
            if getattr(self, name) < 0:
                raise ValueError(f"WFVAEConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.dropout != 0.0:
            raise ValueError("WFVAEConfig.dropout must be 0.0: the released model has no dropout")
        if len(self.scale) != self.latent_dim or len(self.shift) != self.latent_dim:
            raise ValueError(
                f"scale/shift must have latent_dim={self.latent_dim} entries, "
                f"got {len(self.scale)} and {len(self.shift)}"
            )
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "shift", tuple(float(v) for v in self.shift))

    @classmethod
    def released(cls) -> WFVAEConfig:
        """The released v1.5 model (`wfvae_888_dim32.ckpt`, 227,035,816 parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> WFVAEConfig:
        """The golden-vector test config: base 8, flow width 8, latent 32."""
        return cls(base_channels=8, encoder_energy_flow_hidden_size=8, decoder_energy_flow_hidden_size=8)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> WFVAEConfig:
        """Build from an upstream-style "ae" dict, rejecting unsupported variants and unknown keys."""
        own = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in cfg.items():
            if key in own:
                kwargs[key] = value
            elif key in _FIXED_UPSTREAM_VALUES:
                if value not in _FIXED_UPSTREAM_VALUES[key]:
                    raise ValueError(f"unsupported WF-VAE setting {key}={value!r}; "
                                     f"supported: {_FIXED_UPSTREAM_VALUES[key]}")
            elif key not in _IGNORED_UPSTREAM_KEYS:
                raise ValueError(f"unknown WF-VAE config key {key!r}")
        return cls(**kwargs)
