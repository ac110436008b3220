"""Text-to-video pre-training of the SUV MMDiT (Open-Sora Plan v1.5) on megatron-core.

    torchrun --nproc-per-node 8 pretrain_t2v.py --model-config ... --data-config ... [Megatron-style flags]

See `python pretrain_t2v.py --help` and examples/ for launch scripts.
"""

import sys

from megatron_video.training.preflight import preflight

if __name__ == "__main__":
    preflight(sys.argv[1:])  # one clear error (exit 2) before anything heavy; --help without importing megatron
    from megatron_video.training.loop import pretrain

    sys.exit(pretrain(sys.argv[1:]))
