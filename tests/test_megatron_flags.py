"""Flags that carry Megatron-LM's names carry its defaults and meaning (docs/FLAGS.md lists what differs).

The defaults are read from Megatron-LM at tag core_v0.16.1: megatron/training/arguments.py (--weight-decay 0.01,
--adam-beta1 0.9, --adam-beta2 0.999, --adam-eps 1e-08, --clip-grad 1.0, --min-lr 0.0),
megatron/training/common_config.py (seed 1234) and megatron/training/training_config.py
(SchedulerConfig.lr_decay_style = "linear", lr_warmup_iters = 0; LoggerConfig.log_interval = 100);
--recompute-modules defaults to ["core_attn"] in megatron/core/transformer/transformer_config.py.
"""

from __future__ import annotations

import pytest

from megatron_video.arguments import ArgumentError, build_parser, parse_args, validate_args

MEGATRON_DEFAULTS = {
    "lr_decay_style": "linear", "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
    "log_interval": 100, "clip_grad": 1.0, "min_lr": 0.0, "seed": 1234, "lr_warmup_iters": 0,
    "recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None,
    "recompute_modules": None,  # megatron-core's TransformerConfig turns None into ["core_attn"]
}


def test_defaults_are_megatrons():
    args = build_parser().parse_args([])
    assert {name: getattr(args, name) for name in MEGATRON_DEFAULTS} == MEGATRON_DEFAULTS


def test_selective_recompute_means_core_attention():
    from megatron_video.models.suv_mmdit import suv_config
    from megatron_video.models.suv_mmdit.config import megatron_config

    args = build_parser().parse_args(["--recompute-granularity", "selective"])
    validate_args(args, world_size=1)
    config = megatron_config(suv_config("tiny"), recompute_granularity=args.recompute_granularity,
                             recompute_modules=args.recompute_modules)
    assert config.recompute_modules == ["core_attn"]
    args = build_parser().parse_args(["--recompute-granularity", "selective", "--recompute-modules", "mlp"])
    validate_args(args, world_size=1)
    assert args.recompute_modules == ["mlp"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"],
     r"uniform --recompute-num-layers 2: this model recomputes one block at a time"),
    (["--recompute-modules", "mlp"], "--recompute-modules needs --recompute-granularity selective"),
    (["--recompute-granularity", "selective", "--recompute-method", "block", "--recompute-num-layers", "1"],
     "--recompute-method needs --recompute-granularity full"),
])
def test_recompute_combinations_the_model_cannot_take_are_refused(argv, message):
    with pytest.raises(ArgumentError, match=message):
        validate_args(build_parser().parse_args(argv), world_size=1)


def test_recompute_layer_count_beyond_the_model_is_refused(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text("preset: tiny\n")  # 6 blocks
    argv = ["--model-config", str(model), "--recompute-granularity", "full", "--recompute-method", "block",
            "--recompute-num-layers"]
    assert parse_args([*argv, "6"], world_size=1).recompute_num_layers == 6
    with pytest.raises(ArgumentError, match=r"--recompute-num-layers 7 exceeds the model's 6 blocks"):
        parse_args([*argv, "7"], world_size=1)


def test_flag_differences_are_documented():
    from pathlib import Path

    flags = (Path(__file__).resolve().parents[1] / "docs" / "FLAGS.md").read_text()
    for flag in ("--lr", "--clip-grad", "--recompute-modules", "--log-interval", "--tensorboard-dir"):
        assert f"`{flag}`" in flags
