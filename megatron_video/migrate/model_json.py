"""An upstream model JSON (`--mm-model`: MindSpeed-MM examples/opensoraplan1.5/pretrain_model.json, the fork's
examples/opensoraplan1.5/model_opensoraplan1_5.json) -> our model YAML, --vae-config JSON and encoder flags."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from megatron_video.migrate.report import Migration, MigrationError
from megatron_video.models.suv_mmdit.config import PRESETS
from megatron_video.models.suv_mmdit.upstream import (
    COMBINED,
    DIRECT,
    FIXED,
    OLD_NAMES,
    UpstreamConfigError,
    config_from_predictor,
)

BASE_PRESET = "osp-v1.5-8.5b"
_ENCODER_KEYS = {
    "hub_backend": "encoders are local Hugging Face directories here",
    "low_cpu_mem_usage": "a loading option of upstream's from_pretrained call",
    "dtype": "our encoder stage loads the text encoders in fp32",
    "autotokenizer_name": "tokenizers load from the encoder directories (--t5-path / --clip-path)",
}
_VAE_IGNORED = {
    "use_tiling": "our causal-cache tiling equals direct encoding exactly; only memory changes",
    "t_chunk_enc": "encode tiling chunk: --vae-chunk-size (latent frames) sets ours",
    "t_chunk_dec": "decoding is not part of training",
    "dtype": "our WF-VAE is loaded in fp32",
    "from_pretrained": "passed as --vae-path",
}
_TOP_LEVEL = {
    "enable_encoder_dp": "a MindSpeed-MM encoder work-sharing switch; each of our ranks encodes its own batch",
    "frames": "the fork's frame count for its pipeline; frames come from the data config (shape.num_frames)",
    "allow_tf32": "a device matmul setting; not part of the model config here",
    "allow_internal_format": "an Ascend (torch_npu) setting; not part of the model config here",
    "weight_dtype": "the training dtype comes from the launch flags (--bf16 / --fp16)",
}


def translate_model(data: dict[str, Any], mig: Migration) -> None:
    for key, value in data.items():
        if key == "predictor":
            _predictor(value, mig)
        elif key == "ae":
            _vae(value, mig)
        elif key in ("text_encoder", "text_encoder_2"):
            for i, enc in enumerate(value if isinstance(value, list) else [value]):
                _encoder(enc, f"{key}[{i}]" if isinstance(value, list) else key, mig)
        elif key == "tokenizer":
            for i, tok in enumerate(value if isinstance(value, list) else [value]):
                _tokenizer(tok, f"tokenizer[{i}]", mig)
        elif key == "diffusion":
            _diffusion(value, mig)
        elif key == "patch":
            _patch(value, mig)
        elif key in ("load_video_features", "load_text_features"):
            if value:
                mig.drop(key, "upstream feature files are not read: build a feature cache with "
                              "tools/cache_features.py and set cache_path in the data YAML")
            else:
                mig.use(key, "online encoding (no cache_path in the data YAML)")
        elif key in _TOP_LEVEL:
            mig.drop(key, _TOP_LEVEL[key])
        else:
            mig.drop(key, "unknown to this translation; not carried over")


def _predictor(predictor: dict[str, Any], mig: Migration) -> None:
    try:
        cfg, dropped = config_from_predictor(predictor, PRESETS[BASE_PRESET])
    except UpstreamConfigError as exc:
        raise MigrationError(f"predictor: {exc}") from exc
    base = PRESETS[BASE_PRESET]
    mig.model = {"model": "suv_mmdit", "preset": BASE_PRESET}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value != getattr(base, f.name):
            mig.model[f.name] = list(value) if isinstance(value, tuple) else value
    for key in predictor:
        where = f"predictor.{key}"
        if key in dropped:
            mig.drop(where, dropped[key])
        elif key in DIRECT or key in OLD_NAMES:
            field = DIRECT.get(key) or OLD_NAMES[key]
            mig.use(where, f"model: {field} (= {getattr(cfg, field)!r})")
        elif key in FIXED:
            mig.use(where, f"model: built in ({FIXED[key][1]})")
        else:
            mig.use(where, f"model: {COMBINED[key]}")


def _vae(ae: dict[str, Any], mig: Migration) -> None:
    from megatron_video.models.wfvae.config import WFVAEConfig

    try:
        WFVAEConfig.from_dict(ae)
    except ValueError as exc:
        raise MigrationError(f"ae: {exc}") from exc
    mig.vae = {k: v for k, v in ae.items() if k != "from_pretrained"}
    for key in ae:
        if key == "from_pretrained":
            mig.add_flag("ae.from_pretrained", "--vae-path", str(ae[key]))
        elif key in _VAE_IGNORED:
            mig.drop(f"ae.{key}", _VAE_IGNORED[key])
        else:
            mig.use(f"ae.{key}", "--vae-config JSON")


def _encoder(enc: dict[str, Any], where: str, mig: Migration) -> None:
    model_id = enc.get("model_id", "")
    if model_id not in ("T5", "CLIPWithProjection"):
        raise MigrationError(f"{where}.model_id {model_id!r}: ours uses T5 (T5-v1.1-XL) and CLIPWithProjection")
    for key, value in enc.items():
        if key == "from_pretrained":
            mig.add_flag(f"{where}.from_pretrained", "--t5-path" if model_id == "T5" else "--clip-path", str(value))
        elif key == "output_key" and value != "text_embeds":
            raise MigrationError(f"{where}.output_key {value!r}: ours uses CLIP's projected text_embeds")
        elif key in ("model_id", "output_key"):
            mig.use(f"{where}.{key}", f"checked: {value} is what ours uses")
        else:
            mig.drop(f"{where}.{key}", _ENCODER_KEYS.get(key, "unknown to this translation; not carried over"))


def _tokenizer(tok: dict[str, Any], where: str, mig: Migration) -> None:
    clip = "clip" in str(tok.get("from_pretrained", "")).lower()
    for key, value in tok.items():
        if key == "model_max_length":
            mig.set_data(f"{where}.{key}", "caption.max_length_clip" if clip else "caption.max_length_t5", value)
        elif key == "from_pretrained":
            mig.drop(f"{where}.{key}", "tokenizers load from the encoder directories (--t5-path / --clip-path)")
        else:
            mig.drop(f"{where}.{key}", _ENCODER_KEYS.get(key, "unknown to this translation; not carried over"))


def _diffusion(diffusion: dict[str, Any], mig: Migration) -> None:
    expected = {"model_id": "OpenSoraPlan", "weighting_scheme": "logit_normal", "use_dynamic_shifting": True}
    for key, value in diffusion.items():
        if key not in expected:
            mig.drop(f"diffusion.{key}", "unknown to this translation; not carried over")
        elif value != expected[key]:
            raise MigrationError(f"diffusion.{key} = {value!r}: ours trains the v1.5 objective "
                                 f"({key} = {expected[key]!r}; rectified flow, logit-normal sigma, dynamic shift)")
        else:
            mig.use(f"diffusion.{key}", "--objective rectified_flow (logit-normal sigma, dynamic shift)")
    mig.flags += ["--objective", "rectified_flow"]


def _patch(patch: dict[str, Any], mig: Migration) -> None:
    for key, value in patch.items():
        if key == "adaptive_clip_grad_norm" and isinstance(value, dict) and set(value) <= {"clip_grad_ema_decay"}:
            if "clip_grad_ema_decay" in value:
                mig.add_flag("patch.adaptive_clip_grad_norm.clip_grad_ema_decay", "--clip-grad-ema-decay",
                             str(value["clip_grad_ema_decay"]))
        elif key == "ae_float32":
            mig.drop("patch.ae_float32", "our WF-VAE is loaded and run in fp32, as with ae_float32")
        else:
            mig.drop(f"patch.{key}", "unknown to this translation; not carried over")


__all__ = ["BASE_PRESET", "translate_model"]
