"""Load the released WF-VAE checkpoint (`wfvae_888_dim32.ckpt` or a converted flat file) with strict checks.

Nesting, as the upstream loaders read it: prefer a non-empty `ema_state_dict` (keys carry a DDP `module.`
prefix and only trainable tensors), else `state_dict["gen_model"]`, else `state_dict`, else `model`, else
the file is a flat state dict. Files are read with safetensors or `torch.load(weights_only=True)`, so no
arbitrary Python objects are ever unpickled.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.model import WFVAE
from megatron_video.models.wfvae.wavelet import HaarWavelet3D, InverseHaarWavelet3D

_PREFIX = "module."


def read_checkpoint(path: str | Path) -> Any:
    """Read a .safetensors file or a torch checkpoint restricted to tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WF-VAE checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, so it cannot be loaded safely "
            "(weights_only=True); extract its state dict to .safetensors with a trusted tool first"
        ) from err


def _is_tensor_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def extract_state_dict(obj: Any, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Select the generator weights from a loaded checkpoint and strip a `module.` prefix."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"a WF-VAE checkpoint must be a dict, got {type(obj).__name__}")
    candidates: list[Any] = []
    if prefer_ema:
        candidates.append(obj.get("ema_state_dict"))
    inner = obj.get("state_dict")
    if isinstance(inner, Mapping):
        candidates += [inner.get("gen_model"), inner]
    candidates += [obj.get("model"), obj]
    for cand in candidates:
        if _is_tensor_dict(cand):
            return {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in cand.items()}
    raise ValueError("no WF-VAE state dict found: expected 'ema_state_dict', 'state_dict[\"gen_model\"]', "
                     f"'state_dict', 'model' or a flat tensor dict; top-level keys: {sorted(obj)[:10]}")


def fixed_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the constant Haar filters (absent from EMA checkpoints, rebuilt at construction)."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, (HaarWavelet3D, InverseHaarWavelet3D)):
            keys.update(f"{name}.{k}" for k in module.state_dict())
    return keys


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise unless `state` has every learnable tensor with the right shape and nothing unknown.

    The fixed Haar filters may be absent; if present they must hold the filter values.
    """
    expected = model.state_dict()
    fixed = fixed_keys(model)
    missing = sorted(k for k in expected if k not in state and k not in fixed)
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                         for k, v in state.items() if k in expected and v.shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with wrong shapes (e.g. {wrong_shape[:5]})")
    if problems:
        raise ValueError("WF-VAE state dict does not match the model: " + "; ".join(problems))
    for k in fixed & set(state):
        if not expected[k].is_meta and not torch.allclose(state[k].float(), expected[k].float(), atol=1e-6):
            raise ValueError(f"{k} does not hold the Haar filter values (0.3536 pattern)")


def load_wfvae(path: str | Path, config: WFVAEConfig | None = None, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", prefer_ema: bool = True) -> WFVAE:
    """Build the WF-VAE (released config by default), load `path` strictly, and return it frozen in eval."""
    state = extract_state_dict(read_checkpoint(path), prefer_ema=prefer_ema)
    model = WFVAE(config or WFVAEConfig.released())
    check_state_dict(model, state)
    model.load_state_dict(state, strict=False)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()
