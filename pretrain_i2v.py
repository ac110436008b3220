"""Image-to-video / transition / continuation pre-training of the SUV MMDiT by temporal inpainting.

    torchrun --nproc-per-node 8 pretrain_i2v.py --model-config M.yaml --data-config D.yaml \
        --inpaint-config examples/i2v/inpaint.yaml [--init-from-t2v T2V_CKPT_DIR] [Megatron-style flags]

The model config needs `condition_channels: in_channels + 8`. See examples/i2v/ and docs/DESIGN.md §10.
"""

import argparse
import sys

from megatron_video.adaptor.startup import setup_device_from_argv
from megatron_video.training.preflight import preflight


def main(argv: list[str]) -> int:
    setup_device_from_argv(argv)  # first: on Ascend, MindSpeed patches megatron when it is imported
    from megatron_video.inpaint.training import add_i2v_args, check_i2v_args

    preflight(argv, add_i2v_args, check_i2v_args)  # one clear error (exit 2) before anything heavy
    from megatron_video.inpaint.conditioning import i2v_inputs
    from megatron_video.inpaint.config import load_inpaint_config
    from megatron_video.inpaint.training import i2v_setup
    from megatron_video.training.loop import pretrain

    # the preflight has checked the inpainting config, its fit with the model and data configs, and that
    # --init-from-t2v is a complete checkpoint that is safe to read; here it is only loaded for the set-up
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--inpaint-config")
    known, _ = parser.parse_known_args(argv)
    inpaint = load_inpaint_config(known.inpaint_config)
    return pretrain(argv, i2v_inputs, add_i2v_args, setup=i2v_setup(inpaint))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
