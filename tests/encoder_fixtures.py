"""Helpers for the encoder tests: random-weight tiny WF-VAEs and the repository's reference data."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from megatron_video.models.wfvae import WFVAE, WFVAEConfig

REFERENCE_DIR = Path(__file__).resolve().parent / "data"


def reference_file(name: str) -> Path:
    path = REFERENCE_DIR / name
    assert path.is_file(), f"reference file missing from the repository: {path}"
    return path


def random_wfvae(config: WFVAEConfig | None = None, dtype: torch.dtype = torch.float64,
                 seed: int = 0) -> WFVAE:
    """A tiny WF-VAE with non-trivial random weights (default init leaves LayerNorms at identity)."""
    torch.manual_seed(seed)
    model = WFVAE(config or WFVAEConfig(base_channels=4, encoder_energy_flow_hidden_size=4,
                                        decoder_energy_flow_hidden_size=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    return model.to(dtype).eval()


# ---- tiny local text encoders (no hub access) ------------------------------------------------------------

SAMPLE_CAPTIONS = [
    "a cat sits on a red mat",
    "two dogs run across a green field at sunset",
    "a time-lapse of clouds moving over snowy mountains",
    "close-up of a person pouring coffee into a white cup",
    "waves crash against rocks on a rugged coastline",
    "a city street at night with neon lights and rain",
    "an aerial view of a river winding through a forest",
    "a chef slices vegetables on a wooden board",
]


def build_tiny_t5(path: Path, d_model: int = 16) -> Path:
    """A random T5-v1.1-style encoder with a sentencepiece vocabulary trained on the sample captions."""
    import io

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    path.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SAMPLE_CAPTIONS * 10), model_writer=buf, vocab_size=64, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2,
    )
    (path / "spiece.model").write_bytes(buf.getvalue())
    tok = T5Tokenizer.from_pretrained(str(path), extra_ids=0)
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(str(path))
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_bpe(words: Counter[str], num_merges: int) -> list[tuple[str, str]]:
    segs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, s in segs.items():
            for pair in zip(s, s[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = pairs.most_common(1)[0][0]
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out
    return merges


def build_tiny_clip(path: Path, full_model: bool = False, projection_dim: int = 24) -> Path:
    """A random CLIP text model with projection and a small BPE vocabulary learnt from the sample captions.

    `full_model=True` saves a whole CLIPModel (model_type "clip"), as the laion bigG directory is.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    words = Counter(w for c in SAMPLE_CAPTIONS for w in re.findall(r"[a-z]+|[^\sa-z]", c.lower()))
    merges = _learn_bpe(words, 60)
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                 "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(path))
    tok.save_pretrained(str(path))
    torch.manual_seed(1)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    if full_model:
        vision = {"hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
        cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=projection_dim)
        CLIPModel(cfg).save_pretrained(str(path))
    else:
        CLIPTextModelWithProjection(text).save_pretrained(str(path))
    return path
