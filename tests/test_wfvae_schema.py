"""The released WF-VAE config builds with the released names/shapes; checkpoints load with strict checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_video.models.wfvae import WFVAE, WFVAEConfig, check_state_dict, extract_state_dict, load_wfvae
from megatron_video.models.wfvae.loading import fixed_keys

from .encoder_fixtures import random_wfvae, reference_file

RELEASED_PARAMS = 227_035_816


class _Payload:
    created = 0

    def __setstate__(self, state: dict) -> None:
        type(self).created += 1


@pytest.fixture(scope="module")
def meta_model() -> WFVAE:
    with torch.device("meta"):
        return WFVAE(WFVAEConfig.released())


def _released_schema() -> dict[str, tuple[int, ...]]:
    rows = reference_file("wfvae_v1_5_state_dict.tsv").read_text().splitlines()[1:]
    schema = {}
    for row in rows:
        if row.startswith("#"):
            continue
        key, shape = row.split("\t")[:2]
        schema[key] = tuple(int(v) for v in shape.strip("[]").split(","))
    return schema


def test_released_parameter_count(meta_model: WFVAE) -> None:
    assert sum(p.numel() for p in meta_model.parameters()) == RELEASED_PARAMS
    enc = sum(p.numel() for p in meta_model.encoder.parameters())
    assert enc == 60_326_464
    assert sum(p.numel() for p in meta_model.encoder.parameters() if p.requires_grad) == 60_326_272


def test_names_and_shapes_match_released_schema(meta_model: WFVAE) -> None:
    schema = _released_schema()
    ours = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    assert len(schema) == 252
    assert ours == schema
    assert list(ours) == list(schema)  # same order as the released file


def test_schema_state_dict_loads_strictly(meta_model: WFVAE) -> None:
    state = {k: torch.empty(shape, device="meta") for k, shape in _released_schema().items()}
    meta_model.load_state_dict(state, strict=True, assign=True)
    # An EMA-style dict (learnable tensors only) passes the loader's strict check...
    ema = {k: v for k, v in state.items() if k not in fixed_keys(meta_model)}
    assert len(ema) == 204
    check_state_dict(meta_model, ema)
    # ...and a missing or mis-shaped tensor does not.
    broken = dict(ema)
    broken.pop("decoder.conv_in.conv.weight")
    with pytest.raises(ValueError, match="missing"):
        check_state_dict(meta_model, broken)
    broken = dict(ema, **{"encoder.conv_out.conv.bias": torch.empty(32, device="meta")})
    with pytest.raises(ValueError, match="wrong shapes"):
        check_state_dict(meta_model, broken)


def _trainable(model: WFVAE) -> dict[str, torch.Tensor]:
    fixed = fixed_keys(model)
    return {k: v.clone() for k, v in model.state_dict().items() if k not in fixed}


def _assert_same_weights(model: WFVAE, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v.to(loaded[k].dtype)), k


def test_loader_prefers_ema_and_strips_module_prefix(tmp_path: Path) -> None:
    cfg = WFVAEConfig(base_channels=4, encoder_energy_flow_hidden_size=4, decoder_energy_flow_hidden_size=4)
    ema = _trainable(random_wfvae(cfg, torch.float32, seed=1))
    gen = random_wfvae(cfg, torch.float32, seed=2).state_dict()
    ckpt = {"epoch": 3, "current_step": 10, "state_dict": {"gen_model": gen, "dics_model": {}},
            "ema_state_dict": {f"module.{k}": v for k, v in ema.items()}}
    path = tmp_path / "wfvae.ckpt"
    torch.save(ckpt, path)
    model = load_wfvae(path, cfg)
    _assert_same_weights(model, ema)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    _assert_same_weights(load_wfvae(path, cfg, prefer_ema=False), gen)
    # Empty EMA falls back to gen_model; a flat safetensors file loads too.
    torch.save(dict(ckpt, ema_state_dict={}), path)
    _assert_same_weights(load_wfvae(path, cfg), gen)
    flat = tmp_path / "wfvae.safetensors"
    save_file({k: v.contiguous() for k, v in gen.items()}, str(flat))
    bf16 = load_wfvae(flat, cfg, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    _assert_same_weights(bf16, gen)


def test_extract_fallbacks() -> None:
    t = {"a.weight": torch.zeros(1)}
    assert extract_state_dict({"state_dict": t}) == t
    assert extract_state_dict({"model": {"module.a.weight": torch.zeros(1)}}).keys() == t.keys()
    assert extract_state_dict(t) == t
    with pytest.raises(ValueError, match="no WF-VAE state dict"):
        extract_state_dict({"optimizer_state": {"step": 1}})


def test_loader_errors(tmp_path: Path) -> None:
    cfg = WFVAEConfig(base_channels=4, encoder_energy_flow_hidden_size=4, decoder_energy_flow_hidden_size=4)
    with pytest.raises(FileNotFoundError):
        load_wfvae(tmp_path / "absent.ckpt", cfg)
    # A checkpoint of a different architecture fails the strict shape check.
    other = tmp_path / "other.safetensors"
    tiny = random_wfvae(WFVAEConfig.tiny(), torch.float32).state_dict()
    save_file({k: v.contiguous() for k, v in tiny.items()}, str(other))
    with pytest.raises(ValueError, match="wrong shapes"):
        load_wfvae(other, cfg)
    # A pickle with arbitrary objects is refused (weights_only), never instantiated.
    evil = tmp_path / "evil.ckpt"
    torch.save({"ema_state_dict": {}, "sampler_state": _Payload()}, evil)
    _Payload.created = 0
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_wfvae(evil, cfg)
    assert _Payload.created == 0


def test_config_from_upstream_dict() -> None:
    upstream = {"model_id": "wfvae", "base_channels": 160, "latent_dim": 32, "norm_type": "aelayernorm",
                "l1_dowmsample_block": "Spatial2xTime2x3DDownsample", "use_tiling": True,
                "t_interpolation": "trilinear", "vae_scale_factor": [8, 8, 8]}
    assert WFVAEConfig.from_dict(upstream) == WFVAEConfig.released()
    with pytest.raises(ValueError, match="unsupported"):
        WFVAEConfig.from_dict({"norm_type": "groupnorm"})
    with pytest.raises(ValueError, match="unknown"):
        WFVAEConfig.from_dict({"base_channel": 160})
    with pytest.raises(ValueError, match="scale"):
        WFVAEConfig(latent_dim=16)


@pytest.mark.parametrize("n", [1, 3])
def test_decoder_final_stage_has_two_blocks_for_any_num_resblocks(n: int) -> None:
    """Upstream's decoder builds `layer` with `range(2)` whatever num_resblocks is (Open-Sora-Plan
    opensora/models/causalvideovae/model/vae/modeling_wfvae.py and MindSpeed-MM mindspeed_mm/models/ae/wfvae.py,
    Decoder.__init__), while up2 / up1 follow num_resblocks. Names and shapes must follow, or its weights do not
    load for n != 2."""
    cfg = WFVAEConfig(base_channels=8, encoder_energy_flow_hidden_size=8, decoder_energy_flow_hidden_size=8,
                      decoder_num_resblocks=n)
    with torch.device("meta"):
        keys = WFVAE(cfg).decoder.state_dict().keys()
    layer_blocks = {k.split(".")[1] for k in keys if k.startswith("layer.")}
    up2_blocks = {k.split(".")[1] for k in keys if k.startswith("up2.")}
    up1_blocks = {k.split(".")[1] for k in keys if k.startswith("up1.")}
    assert layer_blocks == {"0", "1"}
    assert len(up2_blocks) == len(up1_blocks) == n + 2  # n resblocks + upsampler + closing resblock
