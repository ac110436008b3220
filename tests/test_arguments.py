"""Argument and config-file validation: every error names the offending value."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from megatron_video.arguments import ArgumentError, build_parser, parse_args, validate_args
from megatron_video.configfile import ConfigError, from_mapping, load_dataclass


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_megatron_flag_names_parse():
    args = _args(
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--context-parallel-size", "2",
        "--sequence-parallel", "--micro-batch-size", "2", "--global-batch-size", "16", "--train-iters", "10",
        "--lr", "6e-5", "--min-lr", "1e-5", "--lr-decay-style", "cosine", "--weight-decay", "1e-4",
        "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--adam-eps", "1e-15", "--clip-grad", "1.0", "--bf16",
        "--seed", "42", "--save-interval", "5", "--save", "/tmp/x", "--log-interval", "2",
        "--tensorboard-dir", "/tmp/tb", "--use-distributed-optimizer", "--recompute-granularity", "full",
        "--recompute-method", "uniform", "--recompute-num-layers", "1", "--distributed-backend", "gloo",
    )
    validate_args(args, world_size=16, num_heads=24)
    assert args.tensor_model_parallel_size == 2 and args.sequence_parallel and args.bf16
    assert args.global_batch_size == 16


def test_world_size_not_divisible():
    args = _args("--tensor-model-parallel-size", "2", "--context-parallel-size", "3")
    with pytest.raises(ArgumentError, match=r"world size 8 is not divisible by TP x CP x PP = 2 x 3 x 1 = 6"):
        validate_args(args, world_size=8)


def test_heads_not_divisible_by_tp_cp():
    args = _args("--tensor-model-parallel-size", "4", "--context-parallel-size", "4")
    with pytest.raises(ArgumentError, match=r"attention heads \(24\) are not divisible by TP x CP = 4 x 4 = 16"):
        validate_args(args, world_size=16, num_heads=24)


def test_global_batch_not_divisible():
    args = _args("--micro-batch-size", "3", "--global-batch-size", "20", "--tensor-model-parallel-size", "2")
    with pytest.raises(ArgumentError, match=r"--global-batch-size 20 is not divisible by --micro-batch-size 3 x "
                                            r"data-parallel size 2 = 6"):
        validate_args(args, world_size=4)


def test_global_batch_defaults_to_micro_times_dp():
    args = _args("--micro-batch-size", "3")
    validate_args(args, world_size=4)
    assert args.global_batch_size == 12


def test_missing_paths_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ArgumentError, match=f"--model-config: file not found: {missing}"):
        parse_args(["--model-config", str(missing)], world_size=1)
    with pytest.raises(ArgumentError, match=f"--data-config: file not found: {missing}"):
        parse_args(["--data-config", str(missing)], world_size=1)


def test_sequence_parallel_needs_tp():
    with pytest.raises(ArgumentError, match="--sequence-parallel needs --tensor-model-parallel-size > 1"):
        validate_args(_args("--sequence-parallel"), world_size=2)


def test_pipeline_layer_split_checked():
    args = _args("--pipeline-model-parallel-size", "2", "--pipeline-layer-split", "8,8,16")
    with pytest.raises(ArgumentError, match="must give 2 positive block counts"):
        validate_args(args, world_size=2)


def test_bf16_and_fp16_exclusive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--bf16", "--fp16"])


@dataclass
class _Inner:
    width: int = 4
    ratio: float = 0.5


@dataclass
class _Outer:
    name: str = "x"
    layers: list[int] = field(default_factory=lambda: [1, 2])
    inner: _Inner = field(default_factory=_Inner)
    path: str | None = None


def test_config_file_unknown_key_named(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"name": "a", "hidden_sise": 3}))
    with pytest.raises(ConfigError, match=r"model.json: unknown key\(s\) 'hidden_sise' for _Outer"):
        load_dataclass(_Outer, path)


def test_config_file_nested_and_typed(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("name: b\nlayers: [2, 4, 2]\ninner:\n  width: 8\n  ratio: 1\n")
    config = load_dataclass(_Outer, path)
    assert config.layers == [2, 4, 2] and config.inner.width == 8 and config.inner.ratio == 1.0
    with pytest.raises(ConfigError, match=r"cfg: inner: unknown key\(s\) 'depth'"):
        from_mapping(_Outer, {"inner": {"depth": 2}}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg: layers\[1\]: expected an integer, got 'x'"):
        from_mapping(_Outer, {"layers": [1, "x"]}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg: inner: width: expected an integer, got True"):
        from_mapping(_Outer, {"inner": {"width": True}}, "cfg")


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_config_file_non_finite_number_refused(tmp_path, text):
    path = tmp_path / "model.yaml"
    path.write_text(f"name: b\ninner:\n  width: 8\n  ratio: {text}\n")
    with pytest.raises(ConfigError, match=r"model.yaml: inner: ratio: expected a finite number"):
        load_dataclass(_Outer, path)


def test_config_file_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_dataclass(_Outer, path)
    bad = tmp_path / "model.txt"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match=r"must end in \.json, \.yaml or \.yml"):
        load_dataclass(_Outer, bad)


def test_model_config_file_preset_overrides_and_heads_check(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: small\nnum_heads: 6\n")
    args = parse_args(["--model-config", str(path)], world_size=1)
    assert args.model_config.num_heads == 6 and args.model_config.num_layers == (2, 2, 2, 2, 2)
    released = tmp_path / "released.json"
    released.write_text(json.dumps({"preset": "osp-v1.5-8.5b"}))
    argv = ["--model-config", str(released), "--tensor-model-parallel-size", "4", "--context-parallel-size", "4"]
    with pytest.raises(ArgumentError, match=r"attention heads \(24\) are not divisible by TP x CP = 4 x 4 = 16"):
        parse_args(argv, world_size=16)


def test_model_config_file_errors_named(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: small\nnum_hedas: 6\n")
    with pytest.raises(ArgumentError, match=r"--model-config: .*model.yaml: unknown key\(s\) 'num_hedas'"):
        parse_args(["--model-config", str(path)], world_size=1)
    path.write_text("preset: huge\n")
    with pytest.raises(ArgumentError, match=r"unknown preset 'huge'"):
        parse_args(["--model-config", str(path)], world_size=1)


def test_context_parallel_plan_checked_at_parse_time(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: small\n")  # 4 heads: TP 2 leaves 2 per rank, Ulysses over 4 CP ranks cannot split them
    argv = ["--model-config", str(path), "--tensor-model-parallel-size", "2", "--context-parallel-size", "4"]
    with pytest.raises(ArgumentError, match=r"attention heads \(4\) are not divisible by TP x CP = 2 x 4 = 8"):
        parse_args(argv, world_size=8)
    args = parse_args(argv[:4] + ["--context-parallel-size", "2"], world_size=4)  # 2 heads per TP rank, CP 2
    assert args.context_parallel_size == 2


def test_pipeline_split_must_cover_the_model(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: small\n")  # 10 blocks
    argv = ["--model-config", str(path), "--pipeline-model-parallel-size", "2", "--pipeline-layer-split", "4,5"]
    with pytest.raises(ArgumentError, match="covers 9 blocks, the model has 10"):
        parse_args(argv, world_size=2)
    with pytest.raises(ArgumentError, match="exceeds the model's 10 blocks"):
        parse_args(["--model-config", str(path), "--pipeline-model-parallel-size", "11"], world_size=11)


def test_virtual_pipeline_refused_before_start():
    args = _args("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2")
    with pytest.raises(ArgumentError, match="interleaved pipeline stages are not wired"):
        validate_args(args, world_size=2)


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--min-lr", "nan"),
                                        ("--adam-eps", "inf"), ("--clip-grad", "nan"), ("--weight-decay", "inf"),
                                        ("--clip-grad-ema-decay", "nan"), ("--ema-decay", "nan"),
                                        ("--peak-tflops", "inf"), ("--distributed-timeout-minutes", "inf")])
def test_non_finite_float_flags_refused(flag: str, value: str):
    """Issue 20 item 10: `--lr inf` trained NaN to exit code 0; every float flag must be finite."""
    with pytest.raises(ArgumentError, match=f"{flag} must be a finite number, got {value}"):
        validate_args(_args(flag, value), world_size=1)


@pytest.mark.parametrize("argv,message", [
    (("--lr", "0"), "need --lr > 0"), (("--lr", "1e-4", "--min-lr=-1e-5"), "--min-lr >= 0"),
    (("--adam-beta2", "1.0"), r"--adam-beta2 must be in \[0, 1\)"), (("--adam-eps", "0"), "--adam-eps > 0"),
    (("--lr-warmup-iters=-1",), "--lr-warmup-iters must be >= 0"),
    (("--clip-grad-ema-warmup-steps=-2",), "--clip-grad-ema-warmup-steps must be >= 0"),
    # megatron's scheduler asserts a warm-up shorter than the decay: said here, before any rank starts
    (("--train-iters", "2", "--lr-warmup-iters", "20"),
     r"--lr-warmup-iters 20 must be less than the learning-rate decay length, 2 iterations"),
    (("--train-iters", "50", "--lr-decay-iters", "10", "--lr-warmup-iters", "10"), "decay length, 10 iterations"),
    (("--train-iters", "50", "--lr-decay-iters", "0"), "--lr-decay-iters must be > 0"),
])
def test_hyperparameter_ranges_checked_before_start(argv, message):
    with pytest.raises(ArgumentError, match=message):
        validate_args(_args(*argv), world_size=1)
