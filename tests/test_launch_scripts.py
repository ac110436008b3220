"""examples/opensoraplan1.5: the launch scripts parse, print the torchrun command the trainer accepts, take
everything from the environment, stay equal to the stage table, and carry no secrets or machine paths."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "opensoraplan1.5"
SCRIPTS = ["pretrain_t2v_gpu.sh", "pretrain_t2v_npu.sh", "pretrain_i2v_gpu.sh", "pretrain_i2v_npu.sh"]
STAGES = yaml.safe_load((EXAMPLE / "stages.yaml").read_text())["stages"]
# variables a caller may have set that would change the defaults under test
LAYOUT_VARS = ("STAGE", "TP", "CP", "PP", "MBS", "GBS", "LR", "TRAIN_ITERS", "RECOMPUTE", "NNODES", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "NPUS_PER_NODE", "LOAD_DIR", "SAVE_DIR", "DATA_CONFIG",
               "MODEL_CONFIG", "EXTRA_ARGS", "DRY_RUN", "TORCHRUN", "ASCEND_TOOLKIT_HOME", "VAE_PATH", "T5_PATH",
               "CLIP_PATH", "PEAK_TFLOPS", "TENSORBOARD_DIR")


def _run(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in LAYOUT_VARS}
    return subprocess.run(["bash", str(EXAMPLE / script)], env={**base, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _dry_run(script: str, tmp_path: Path, **env: str) -> list[str]:
    result = _run(script, tmp_path, DRY_RUN="1", **env)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def _flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


@pytest.mark.parametrize("path", sorted(EXAMPLE.glob("*.sh")), ids=lambda p: p.name)
def test_bash_syntax(path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("stage", ["video1", "video4"])
def test_dry_run_command_is_accepted_by_the_trainer(script: str, stage: str, tmp_path: Path) -> None:
    from megatron_video.arguments import parse_args

    npu = "npu" in script
    per_node = {"NPUS_PER_NODE" if npu else "GPUS_PER_NODE": "8"}
    words = _dry_run(script, tmp_path, STAGE=stage, NNODES="4", NODE_RANK="1", MASTER_ADDR="head", MASTER_PORT="6000",
                     SAVE_DIR="out/ck", **per_node)
    assert words[0] == "torchrun"
    assert (_flag(words, "--nnodes"), _flag(words, "--node-rank"), _flag(words, "--nproc-per-node")) == ("4", "1", "8")
    assert (_flag(words, "--master-addr"), _flag(words, "--master-port")) == ("head", "6000")
    entry = next(w for w in words if w.endswith(".py"))
    i2v = "i2v" in script
    assert Path(entry).name == ("pretrain_i2v.py" if i2v else "pretrain_t2v.py")
    assert Path(entry).parent == REPO
    extra = None
    if i2v:
        from megatron_video.inpaint.training import add_i2v_args as extra
    args = parse_args(words[words.index(entry) + 1:], world_size=32, extra_args=extra)  # loads both configs
    if i2v:  # the inpainting config fits the model and data configs, as pretrain_i2v.py checks first
        from megatron_video.inpaint.config import load_inpaint_config
        from megatron_video.inpaint.training import check_i2v_configs

        check_i2v_configs(load_inpaint_config(args.inpaint_config), args.model_config, args.data_config)
        assert args.model_config.condition_channels > 0
    s = STAGES[stage]
    assert args.device == ("npu" if npu else "cuda") and args.bf16 and args.use_distributed_optimizer
    assert (args.tensor_model_parallel_size, args.micro_batch_size, args.global_batch_size, args.train_iters) == \
        (s["tp"], s["micro_batch"], s["global_batch"], s["steps"])
    assert args.lr == pytest.approx(s["lr"]) and args.sequence_parallel == (s["tp"] > 1)
    assert args.data_config.shape.num_frames == s["frames"] and args.data_config.shape.height == s["height"]
    assert args.model_config.num_heads == 24 and args.save == "out/ck" and args.load == "out/ck"
    assert "--inpaint-config" not in words or i2v
    assert args.recompute_granularity == "selective" and args.recompute_modules == ["mlp"]  # the FFN half
    # the released recipe, passed explicitly (the trainer's defaults are Megatron's: docs/FLAGS.md)
    assert (args.lr_decay_style, args.weight_decay, args.adam_eps) == ("constant", 1e-4, 1e-15)


def test_environment_overrides_everything(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    words = _dry_run("pretrain_t2v_gpu.sh", tmp_path, STAGE="video3", NNODES="4", TP="8", CP="2", PP="2", MBS="1",
                     GBS="64", RECOMPUTE="full", LOAD_DIR="ck", MODEL_CONFIG="m.yaml", DATA_CONFIG="d.yaml",
                     EXTRA_ARGS="--ema-decay 0 --log-interval 5", VAE_PATH="vae.pt", TORCHRUN="python -m x")
    assert words[0] == "python -m x"  # one word: a path to a torchrun binary
    for flag, value in (("--tensor-model-parallel-size", "8"), ("--context-parallel-size", "2"),
                        ("--pipeline-model-parallel-size", "2"), ("--micro-batch-size", "1"),
                        ("--global-batch-size", "64"), ("--load", "ck"), ("--model-config", "m.yaml"),
                        ("--data-config", "d.yaml"), ("--vae-path", "vae.pt"), ("--recompute-method", "uniform")):
        assert _flag(words, flag) == value
    assert words[-4:] == ["--ema-decay", "0", "--log-interval", "5"]


def test_stage_defaults_equal_the_stage_table(tmp_path: Path) -> None:
    for stage, s in STAGES.items():
        out = subprocess.run(
            ["bash", "-c", f'STAGE={stage}; source "{EXAMPLE}/stage_defaults.sh"; echo $TP $MBS $GBS $LR $TRAIN_ITERS'],
            capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k not in LAYOUT_VARS},
        ).stdout.split()
        assert [int(out[0]), int(out[1]), int(out[2]), float(out[3]), int(out[4])] == \
            [s["tp"], s["micro_batch"], s["global_batch"], s["lr"], s["steps"]], stage
        assert (EXAMPLE / "data" / f"{stage}.yaml").is_file()


@pytest.mark.parametrize("env, message", [
    ({"STAGE": "video9"}, "unknown STAGE"),
    ({"TP": "3"}, "not divisible by TP x CP x PP"),
    ({"RECOMPUTE": "half"}, "RECOMPUTE must be"),
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK 2 must be below"),
    ({"MBS": "two"}, "MBS must be"),
])
def test_bad_environment_fails_before_launch(env: dict, message: str, tmp_path: Path) -> None:
    result = _run("pretrain_t2v_gpu.sh", tmp_path, DRY_RUN="1", **env)
    assert result.returncode == 2 and message in result.stderr and not result.stdout


def test_launch_execs_torchrun(tmp_path: Path) -> None:
    stub = tmp_path / "torchrun-stub"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$OUT"\n')
    stub.chmod(0o755)
    result = _run("pretrain_t2v_gpu.sh", tmp_path, TORCHRUN=str(stub), OUT=str(tmp_path / "args"),
                  SAVE_DIR="run/ck", GPUS_PER_NODE="2")
    assert result.returncode == 0, result.stderr
    words = (tmp_path / "args").read_text().splitlines()
    assert _flag(words, "--nproc-per-node") == "2" and (tmp_path / "run" / "ck").is_dir()


def test_ascend_environment(tmp_path: Path) -> None:
    cann = tmp_path / "cann"
    cann.mkdir()
    (cann / "set_env.sh").write_text("export CANN_MARKER=loaded\n")
    out = subprocess.run(
        ["bash", "-c", f'source "{EXAMPLE}/npu_env.sh" && echo $CANN_MARKER $HCCL_CONNECT_TIMEOUT $HCCL_EXEC_TIMEOUT'],
        env={**os.environ, "ASCEND_TOOLKIT_HOME": str(cann), "HCCL_EXEC_TIMEOUT": "99"}, capture_output=True,
        text=True,
    ).stdout.split()
    assert out == ["loaded", "1200", "99"]
    missing = _run("pretrain_t2v_npu.sh", tmp_path, ASCEND_TOOLKIT_HOME=str(tmp_path / "none"))
    assert missing.returncode == 2 and "ASCEND_TOOLKIT_HOME" in missing.stderr


SECRET = re.compile(r"(password|passwd|secret|token|access[_-]?key|api[_-]?key)\s*[=:]", re.I)
MACHINE_PATH = re.compile(r"(?<![\w}.])/(home|root|work|tmp|Users|mnt|data)/")  # absolute, not ${here}/data/


def test_no_secrets_or_machine_paths() -> None:
    files = [*EXAMPLE.glob("*.sh"), *EXAMPLE.glob("*.yaml"), *(EXAMPLE / "data").glob("*.yaml")]
    for path in files:
        text = path.read_text()
        assert not SECRET.search(text), path
        if not path.name.startswith("job_"):  # example job files show where a site mounts its data
            assert not MACHINE_PATH.search(text), path
