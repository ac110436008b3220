"""tools/import_mindspeed.py on synthetic MindSpeed-MM / fork files (tests/data/mindspeed/, shaped like theirs):
every upstream setting is carried over or listed with a reason, and what is written loads with our own loaders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_video.arguments import build_parser
from megatron_video.data.config import DataConfig
from megatron_video.migrate.launch import script_args
from megatron_video.migrate.run import migrate
from megatron_video.models.registry import model_config_from_mapping
from megatron_video.models.suv_mmdit.config import PRESETS
from megatron_video.models.wfvae.config import WFVAEConfig

DATA = Path(__file__).parent / "data/mindspeed"
REPO = Path(__file__).resolve().parents[1]


def _settings(mig) -> list[str]:
    return [s for s, _ in mig.used] + [s for s, _ in mig.dropped]


def _assert_accounted(mig, model_json: Path, data_json: Path, script: Path) -> list[str]:
    """Each upstream key / flag is reported exactly once (a key holding a list or mapping: through its parts)."""
    settings = _settings(mig)
    model, data = json.loads(model_json.read_text()), json.loads(data_json.read_text())
    expected = [f"predictor.{k}" for k in model["predictor"]]
    expected += [f"dataset_param.preprocess_parameters.{k}" for k in data["dataset_param"]["preprocess_parameters"]]
    expected += [f"dataloader_param.{k}" for k in data["dataloader_param"]]
    words = script_args(script.read_text())
    flags = [w for w in words if w.startswith("--")]
    shown = [f"{w} {words[i + 1]}" if i + 1 < len(words) and not words[i + 1].startswith("--") else w
             for i, w in enumerate(words) if w.startswith("--")]
    expected += shown
    for setting in expected:
        assert settings.count(setting) == 1, setting
    for key in list(model) + list(data["dataset_param"]):
        assert any(s == key or s.startswith((f"{key}.", f"{key}[")) or s == f"dataset_param.{key}"
                   or s.startswith((f"dataset_param.{key}.", f"dataset_param.{key}[")) for s in settings), key
    return flags


def test_mindspeed_mm_setup(tmp_path: Path) -> None:
    mig = migrate(tmp_path, str(DATA / "msmm_pretrain_model.json"), str(DATA / "msmm_data.json"),
                  str(DATA / "msmm_pretrain.sh"))
    flags = _assert_accounted(mig, DATA / "msmm_pretrain_model.json", DATA / "msmm_data.json",
                              DATA / "msmm_pretrain.sh")
    assert len(flags) == 43  # the flags MindSpeed-MM's v1.5 script passes
    assert len(json.loads((DATA / "msmm_pretrain_model.json").read_text())["predictor"]) == 22
    # the model, data and VAE files load with our loaders and mean the released setup
    from megatron_video.configfile import read_mapping

    assert model_config_from_mapping(read_mapping(tmp_path / "model.yaml")) == PRESETS["osp-v1.5-8.5b"]
    data = DataConfig.from_dict(read_mapping(tmp_path / "data.yaml")).validate()
    assert (data.shape.resolution_mode, data.shape.max_tokens, data.shape.min_tokens) == ("minmax", 147456, 147456)
    assert (data.shape.num_frames, data.shape.min_num_frames, data.shape.fps) == (57, 29, 12)
    assert (data.caption.max_length_t5, data.caption.max_length_clip, data.num_workers) == (512, 77, 8)
    assert WFVAEConfig.from_dict(json.loads((tmp_path / "vae.json").read_text())) == WFVAEConfig.released()
    args = build_parser().parse_args((tmp_path / "launch_flags.txt").read_text().split())
    assert (args.tensor_model_parallel_size, args.global_batch_size) == (4, 4)  # GBS = 8 x 2 x 1 / 1 / 4
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("full", "block", 32)
    assert (args.clip_grad_ema_decay, args.ema_decay, args.adam_eps, args.no_load_optim) == (0.99, 0.0, 1e-15, True)
    assert (args.vae_path, args.t5_path, args.clip_path) == ("weights/wfvae.pt", "weights/t5-xl", "weights/clip-bigG")
    assert args.model_config == str(tmp_path / "model.yaml") and args.data_config == str(tmp_path / "data.yaml")
    assert "--load" not in args.__dict__ or args.load is None  # their checkpoint is imported first, not loaded
    report = (tmp_path / "MIGRATION.txt").read_text()
    assert "--load ckpt/msmm_in" in report and "--from mindspeed-mm" in report


def test_fork_setup(tmp_path: Path) -> None:
    mig = migrate(tmp_path, str(DATA / "fork_model.json"), str(DATA / "fork_data.json"), str(DATA / "fork_pretrain.sh"),
                  flavour="osp-fork")
    _assert_accounted(mig, DATA / "fork_model.json", DATA / "fork_data.json", DATA / "fork_pretrain.sh")
    args = build_parser().parse_args((tmp_path / "launch_flags.txt").read_text().split())
    # --recompute-num-layers 0 turns the fork's full recompute off; its --selective_recom is the FFN half
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("selective", None, None)
    assert (args.ema_decay, args.clip_grad_ema_decay, args.seed, args.tensor_model_parallel_size) == \
        (0.9999, 0.99, 1024, 8)
    from megatron_video.configfile import read_mapping

    data = DataConfig.from_dict(read_mapping(tmp_path / "data.yaml")).validate()
    assert (data.shape.resolution_mode, data.shape.height, data.shape.width) == ("forced", 576, 1024)
    assert data.shape.min_num_frames == 121  # drop_short_ratio 1.0: shorter videos are dropped
    assert model_config_from_mapping(read_mapping(tmp_path / "model.yaml")) == PRESETS["osp-v1.5-8.5b"]
    assert not (tmp_path / "vae.json").exists()  # the fork's model JSON has no ae section


@pytest.mark.parametrize("edit, message", [
    (("model", "predictor", "norm_cls", "rms_norm"), "norm_cls"),
    (("data", "preprocess_parameters", "frame_interval", 2), "frame_interval"),
    (("data", "preprocess_parameters", "drop_short_ratio", 0.5), "drop_short_ratio"),
    (("model", "diffusion", "use_dynamic_shifting", False), "use_dynamic_shifting"),
])
def test_values_we_cannot_reproduce_are_errors(tmp_path: Path, capsys, edit, message) -> None:
    which, section, key, value = edit
    model = json.loads((DATA / "msmm_pretrain_model.json").read_text())
    data = json.loads((DATA / "msmm_data.json").read_text())
    if which == "model":
        model[section][key] = value
    else:
        data["dataset_param"][section][key] = value
    (tmp_path / "m.json").write_text(json.dumps(model))
    (tmp_path / "d.json").write_text(json.dumps(data))
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from import_mindspeed import main
    finally:
        sys.path.pop(0)
    out = tmp_path / "out"
    code = main(["--mm-model", str(tmp_path / "m.json"), "--mm-data", str(tmp_path / "d.json"), "--out", str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_script_parsing_expands_variables_and_arithmetic(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text('A=3\nB=$(($A*4/2))\nX="--lr 1e-5 \\\n  --micro-batch-size ${A}"\nY="--global-batch-size $B\n'
                      '  --seed 7"\n# python pretrain_old.py --nope\ntorchrun x.py pretrain_sora.py $X $Y --bf16 '
                      '2>&1 | tee log\n')
    assert script_args(script.read_text()) == ["--lr", "1e-5", "--micro-batch-size", "3", "--global-batch-size", "6",
                                               "--seed", "7", "--bf16"]


def test_script_alone_names_the_configs_it_did_not_translate(tmp_path: Path) -> None:
    mig = migrate(tmp_path, script=str(DATA / "msmm_pretrain.sh"))
    reasons = dict(mig.dropped)
    assert "--mm-data" in reasons["--mm-data ./examples/opensoraplan1.5/data.json"]
    assert "--data-config" not in mig.flags and "--model-config" not in mig.flags
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MIGRATION.txt", "launch_flags.txt"]
