"""Text-to-video pre-training of the SUV MMDiT (Open-Sora Plan v1.5) on megatron-core.

    torchrun --nproc-per-node 8 pretrain_t2v.py --model-config ... --data-config ... [Megatron-style flags]

See `python pretrain_t2v.py --help` and examples/ for launch scripts.
"""

import sys

from megatron_video.adaptor.startup import setup_device_from_argv
from megatron_video.training.preflight import preflight

if __name__ == "__main__":
    setup_device_from_argv(sys.argv[1:])  # first: on Ascend, MindSpeed patches megatron when it is imported
    preflight(sys.argv[1:])  # one clear error (exit 2) before anything heavy
    from megatron_video.training.loop import pretrain

    sys.exit(pretrain(sys.argv[1:]))
