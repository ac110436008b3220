"""Structure-controller training (Open-Sora Plan §2.3.2): canny / depth / sketch control of a frozen SUV denoiser.

    torchrun --nproc-per-node 8 pretrain_control.py --model-config M.yaml --data-config D.yaml \
        --base BASE --structure-signal canny [Megatron-style flags]

`--base` is one of our checkpoints (`--base-weights model|ema`) or released weights; only the controller (encoder
+ projectors) trains, and its checkpoints hold only the controller. Export it with tools/export_control.py.
See docs/DESIGN.md §15.
"""

import sys

from megatron_video.adaptor.startup import setup_device_from_argv
from megatron_video.training.preflight import preflight


def main(argv: list[str]) -> int:
    setup_device_from_argv(argv)  # first: on Ascend, MindSpeed patches megatron when it is imported
    from megatron_video.control.training import add_control_args, check_control_args

    preflight(argv, add_control_args, check_control_args)  # one clear error (exit 2) before anything heavy
    from megatron_video.control.training import control_inputs, control_setup, control_wrap
    from megatron_video.training.loop import pretrain

    return pretrain(argv, control_inputs, add_control_args, setup=control_setup, wrap=control_wrap)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
