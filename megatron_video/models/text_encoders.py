"""Frozen text encoders of Open-Sora Plan v1.5 through `transformers`: the T5-v1.1 encoder (last hidden state,
up to 512 tokens, attention mask kept) and the CLIP text model with projection (pooled `text_embeds`, 77
tokens), loaded from local Hugging Face-layout directories. Optionally only some ranks run them and broadcast
the results to the rest of their model replica.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

T5_MODEL_TYPES = ("t5",)
CLIP_MODEL_TYPES = ("clip_text_model", "clip")  # a text-only export, or a full CLIP model directory
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class TextEmbeddings:
    """Per-caption conditioning: T5 hidden states (B, L, D_t5), their mask (B, L) with 1 = real token and
    0 = padding (int64), and the CLIP pooled projection (B, D_clip)."""

    t5_hidden: torch.Tensor
    t5_mask: torch.Tensor
    clip_pooled: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Unpack as `t5_hidden, t5_mask, clip_pooled = encoders.encode(captions)`."""
        return iter((self.t5_hidden, self.t5_mask, self.clip_pooled))

    def to(self, device: torch.device | str) -> TextEmbeddings:
        return TextEmbeddings(self.t5_hidden.to(device), self.t5_mask.to(device), self.clip_pooled.to(device))


def read_model_type(path: str | Path, allowed: tuple[str, ...], what: str) -> str:
    """Validate a local model directory and return its `model_type` (clear errors before loading weights)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{what} directory {path} has no config.json (expected a Hugging Face "
                                "layout)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in allowed:
        raise ValueError(f"{what} at {path} has model_type {model_type!r}; expected one of {allowed}")
    return model_type


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"text encoder dtype must be one of {_DTYPES}, got {dtype}")


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 names the argument `dtype`; older releases only know `torch_dtype`."""
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load(cls: type, path: str | Path, what: str, dtype: torch.dtype, **kwargs: object) -> nn.Module:
    """from_pretrained that refuses checkpoints missing weights (which would silently stay random)."""
    model, info = cls.from_pretrained(str(path), output_loading_info=True, **_dtype_kwargs(dtype), **kwargs)
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise ValueError(f"{what} at {path} lacks {len(missing)} weights (e.g. {sorted(missing)[:5]}): "
                         "wrong model directory?")
    return model


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class T5TextEncoder:
    """T5-v1.1 encoder: captions -> (last_hidden_state (B, L, D), attention mask (B, L)), L = max_length."""

    def __init__(self, path: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", max_length: int = 512,
                 tokenizer_path: str | Path | None = None) -> None:
        from transformers import T5EncoderModel, T5Tokenizer

        _check_dtype(dtype)
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        read_model_type(path, T5_MODEL_TYPES, "T5 encoder")
        tok_dir = Path(tokenizer_path or path)
        if not tok_dir.is_dir():
            raise FileNotFoundError(f"T5 tokenizer directory not found: {tok_dir}")
        self.max_length = max_length
        self.tokenizer = T5Tokenizer.from_pretrained(str(tok_dir))
        self.model = _freeze(_load(T5EncoderModel, path, "T5 encoder", dtype=dtype).to(device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask


class CLIPTextEncoder:
    """CLIP text model with projection: captions -> pooled, projected `text_embeds` (B, D)."""

    def __init__(self, path: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", max_length: int = 77,
                 tokenizer_path: str | Path | None = None) -> None:
        from transformers import CLIPConfig, CLIPTextModelWithProjection, CLIPTokenizer

        _check_dtype(dtype)
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        model_type = read_model_type(path, CLIP_MODEL_TYPES, "CLIP text encoder")
        tok_dir = Path(tokenizer_path or path)
        if not tok_dir.is_dir():
            raise FileNotFoundError(f"CLIP tokenizer directory not found: {tok_dir}")
        config = None
        if model_type == "clip":
            # A full CLIP model keeps projection_dim at the top level; the text sub-config must carry it.
            full = CLIPConfig.from_pretrained(str(path))
            config = full.text_config
            config.projection_dim = full.projection_dim
        self.max_length = max_length
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        model = _load(CLIPTextModelWithProjection, path, "CLIP text encoder", config=config, dtype=dtype)
        if max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the CLIP model's "
                             f"{model.config.max_position_embeddings} positions")
        self.model = _freeze(model.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(captions)
        # Explicit positions: the model's non-persistent position buffer is not trustworthy after loading
        # under patched tensor factories (seen with the cpu device adaptor and transformers 5).
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
        # CLIP's causal attention makes the EOS-pooled output independent of the padding after it.
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions)
        return out.text_embeds


class TextEncoders:
    """The v1.5 text-encoder pair. `encode(captions)` -> TextEmbeddings, in micro-batches of `batch_size`."""

    def __init__(self, t5: T5TextEncoder, clip: CLIPTextEncoder, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.t5, self.clip, self.batch_size = t5, clip, batch_size

    @classmethod
    def from_pretrained(cls, t5_path: str | Path, clip_path: str | Path, *,
                        dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                        t5_max_length: int = 512, clip_max_length: int = 77,
                        batch_size: int | None = None) -> TextEncoders:
        # Validate both directories before loading either model.
        read_model_type(t5_path, T5_MODEL_TYPES, "T5 encoder")
        read_model_type(clip_path, CLIP_MODEL_TYPES, "CLIP text encoder")
        t5 = T5TextEncoder(t5_path, dtype=dtype, device=device, max_length=t5_max_length)
        clip = CLIPTextEncoder(clip_path, dtype=dtype, device=device, max_length=clip_max_length)
        return cls(t5, clip, batch_size)

    def encode(self, captions: list[str]) -> TextEmbeddings:
        if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a non-empty list of strings")
        step = self.batch_size or len(captions)
        parts = []
        for i in range(0, len(captions), step):
            chunk = list(captions[i: i + step])
            hidden, mask = self.t5(chunk)
            parts.append((hidden, mask, self.clip(chunk)))
        return TextEmbeddings(*(torch.cat(p, dim=0) for p in zip(*parts)))


# ---- running on a subset of ranks ------------------------------------------------------------------------

def share_text_embeddings(emb: TextEmbeddings | None, group: dist.ProcessGroup | None, src: int,
                          device: torch.device | str = "cpu") -> TextEmbeddings:
    """Broadcast `emb` from global rank `src` to every rank of `group`; the others pass None.

    A small header (shapes, dtypes) goes first so receivers need not know the encoder config.
    """
    from megatron_video.parallel.broadcast import broadcast_tensors

    if group is not None and src not in dist.get_process_group_ranks(group):
        raise ValueError(f"source rank {src} is not in the group {dist.get_process_group_ranks(group)}")
    if dist.get_rank() == src and emb is None:
        raise ValueError(f"rank {src} is the source but has no embeddings to share")
    tensors = None if emb is None else [emb.t5_hidden, emb.t5_mask.to(torch.int64), emb.clip_pooled]
    return TextEmbeddings(*broadcast_tensors(tensors, 3, group, src, device))


def encode_on_subset(encoders: TextEncoders | None, captions: list[str] | None,
                     group: dist.ProcessGroup | None, src: int,
                     device: torch.device | str = "cpu") -> TextEmbeddings:
    """Encode on global rank `src` only (it must hold `encoders` and the captions) and share the result with
    the other ranks of `group` (e.g. the tensor/context-parallel ranks of one model replica)."""
    emb = None
    if dist.get_rank() == src:
        if encoders is None or captions is None:
            raise ValueError(f"source rank {src} needs the text encoders and the captions")
        emb = encoders.encode(captions)
    return share_text_embeddings(emb, group, src, device)
