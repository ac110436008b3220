"""Model configs from `--model-config` files: `{"preset": "small", ...field overrides}` or every field spelled out."""

from __future__ import annotations

from typing import Any

from megatron_video.configfile import ConfigError, checked_values


def model_config_from_mapping(data: dict[str, Any], source: str = "model config") -> Any:
    """A `SUVConfig` from a mapping; `preset` names the base (default: the released 8.5B), other keys override."""
    from megatron_video.models.suv_mmdit.config import PRESETS, SUVConfig

    data = dict(data)
    model = data.pop("model", "suv_mmdit")
    if model != "suv_mmdit":
        raise ConfigError(f"{source}: unknown model {model!r}; known: 'suv_mmdit'")
    preset = data.pop("preset", "osp-v1.5-8.5b")
    if preset not in PRESETS:
        raise ConfigError(f"{source}: unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset]
    overrides = checked_values(SUVConfig, data, source)  # unknown keys and wrong types are named here
    try:
        return base.replace(**overrides)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
