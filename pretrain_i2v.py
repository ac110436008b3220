"""Image-to-video / transition / continuation pre-training of the SUV MMDiT by temporal inpainting.

    torchrun --nproc-per-node 8 pretrain_i2v.py --model-config M.yaml --data-config D.yaml \
        --inpaint-config examples/i2v/inpaint.yaml [--init-from-t2v T2V_CKPT_DIR] [Megatron-style flags]

The model config needs `condition_channels: in_channels + 8`. See examples/i2v/ and docs/DESIGN.md §10.
"""

import argparse
import sys
from pathlib import Path

from megatron_video.adaptor.startup import setup_device_from_argv
from megatron_video.training.preflight import preflight


def main(argv: list[str]) -> int:
    setup_device_from_argv(argv)  # first: on Ascend, MindSpeed patches megatron when it is imported
    from megatron_video.inpaint.training import add_i2v_args, check_i2v_args

    preflight(argv, add_i2v_args, check_i2v_args)  # one clear error (exit 2) before anything heavy
    from megatron_video.configfile import from_mapping, read_mapping
    from megatron_video.data.config import DataConfig
    from megatron_video.inpaint.conditioning import i2v_inputs
    from megatron_video.inpaint.config import load_inpaint_config
    from megatron_video.inpaint.training import check_i2v_configs, i2v_setup
    from megatron_video.models.registry import model_config_from_mapping
    from megatron_video.training.checkpoint_safety import checkpoint_refusal, report_refusal
    from megatron_video.training.loop import pretrain

    # the inpainting config and its fit with the model / data configs are checked before anything starts
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--inpaint-config", "--model-config", "--data-config", "--init-from-t2v"):
        parser.add_argument(flag)
    known, _ = parser.parse_known_args(argv)
    if known.inpaint_config is None:  # the full parser prints --help or names the missing flag
        return pretrain(argv, i2v_inputs, add_i2v_args)
    if known.init_from_t2v is not None and not Path(known.init_from_t2v).is_dir():
        raise SystemExit(f"--init-from-t2v: checkpoint directory not found: {known.init_from_t2v}")
    refusal = checkpoint_refusal(known.init_from_t2v, "--init-from-t2v")
    if refusal is not None:
        return report_refusal(refusal)
    inpaint = load_inpaint_config(known.inpaint_config)
    if known.model_config and known.data_config:
        model = model_config_from_mapping(read_mapping(known.model_config), source=known.model_config)
        check_i2v_configs(inpaint, model, from_mapping(DataConfig, read_mapping(known.data_config)))
    return pretrain(argv, i2v_inputs, add_i2v_args, setup=i2v_setup(inpaint))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
