#!/usr/bin/env python
"""Sample videos from one of our checkpoints (model or EMA weights) or from released Open-Sora Plan weights.

    python tools/sample.py --model-config M.yaml --load CKPT --weights ema --prompts prompts.txt \
        --vae-path wfvae.ckpt --t5-path T5 --clip-path CLIP --num-frames 57 --height 288 --width 512 --out samples/
    python tools/sample.py --model-config M.yaml --released model_ema.safetensors ...       # released format
    torchrun --nproc-per-node 4 tools/sample.py --tensor-model-parallel-size 2 ...            # training layout

Prompt i is sampled with seed --seed + i; MP4 files, latents and a JSON record per sample go to --out.
Bad inputs are reported before any weights load (exit code 2). `--help` lists every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.sampling.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
