"""Our side of MindSpeed's contract (Ascend), checked against stand-ins for `torch_npu` and `mindspeed`.

- `mindspeed.megatron_adaptor` patches megatron-core when it is imported, so it must come before any megatron
  import (mindspeed/megatron_adaptor.py, core_r0.16.0: "apply patches before import megatron").
- MindSpeed reads its own flags from sys.argv (mindspeed/args_utils.py get_mindspeed_args: parse_known_args on
  the features' parser); with --device npu our parser lets them through, on other devices they stay errors.
- MindSpeed wraps torch.distributed.all_reduce for float64: it reduces a float32 copy, waits, and returns None
  without writing back (mindspeed/core/megatron_basic/requirements_basic.py,
  torch_all_reduce_double_dtype_bypass_wrapper), so a float64 tensor handed to it keeps its local value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.harness import run_distributed

REPO = Path(__file__).resolve().parents[1]

TORCH_NPU = '''
"""Stand-in torch_npu: registers a `torch.npu` namespace whose set_device records the call and ends the run."""
import json, os, sys, types
import torch


def _set_device(index):
    with open(os.environ["STANDIN_RECORD"], "a") as handle:
        handle.write(json.dumps({"event": "set_device", "index": index}) + "\\n")
    sys.exit(0)


torch.npu = types.SimpleNamespace(set_device=_set_device, synchronize=lambda: None)
'''

MEGATRON_ADAPTOR = '''
"""Stand-in mindspeed.megatron_adaptor: records which megatron modules were imported before it."""
import json, os, sys

loaded = sorted(m for m in sys.modules if m == "megatron" or m.startswith("megatron."))
with open(os.environ["STANDIN_RECORD"], "a") as handle:
    handle.write(json.dumps({"event": "mindspeed", "megatron_modules": loaded, "argv": sys.argv[1:]}) + "\\n")
'''


def _stand_ins(root: Path) -> Path:
    (root / "torch_npu").mkdir(parents=True)
    (root / "torch_npu" / "__init__.py").write_text(TORCH_NPU)
    (root / "mindspeed").mkdir()
    (root / "mindspeed" / "__init__.py").write_text("")
    (root / "mindspeed" / "megatron_adaptor.py").write_text(MEGATRON_ADAPTOR)
    return root


def _configs(root: Path, entry: str) -> list[str]:
    # metadata files that exist (the preflight checks them before the run reaches the device)
    (root / "annotation.json").write_text("[]")
    (root / "data.txt").write_text(f"{root},{root / 'annotation.json'}\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"metadata_paths": [str(root / "data.txt")]}))
    if entry == "pretrain_i2v.py":  # its own pre-check loads the model package before the full parser
        return ["--model-config", str(REPO / "examples/i2v/model_small_i2v.yaml"), "--data-config",
                str(root / "data.yaml"), "--inpaint-config", str(REPO / "examples/i2v/inpaint.yaml")]
    (root / "model.yaml").write_text(yaml.safe_dump({"preset": "small"}))
    return ["--model-config", str(root / "model.yaml"), "--data-config", str(root / "data.yaml")]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["pretrain_t2v.py", "pretrain_i2v.py"])
def test_mindspeed_patches_before_megatron_and_keeps_its_flags(tmp_path: Path, entry: str):
    standins, record = _stand_ins(tmp_path / "standins"), tmp_path / "record.jsonl"
    argv = ["--device", "npu", "--distributed-backend", "gloo", "--optimizer-selection", "fused_adamw",
            "--use-fused-rmsnorm", *_configs(tmp_path, entry), "--train-iters", "1"]
    env = dict(os.environ, PYTHONPATH=f"{standins}{os.pathsep}{REPO}", STANDIN_RECORD=str(record))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(REPO / entry), *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    assert [e["event"] for e in events] == ["mindspeed", "set_device"], proc.stderr[-3000:]
    assert events[0]["megatron_modules"] == [], "megatron was imported before mindspeed.megatron_adaptor"
    assert events[0]["argv"] == argv  # MindSpeed sees its flags on sys.argv
    assert proc.returncode == 0, proc.stderr[-3000:]  # parsed (MindSpeed's flags accepted) up to set_device


def test_mindspeed_flags_pass_only_on_npu(capsys: pytest.CaptureFixture[str]):
    from megatron_video.arguments import parse_args

    flags = ["--optimizer-selection", "fused_adamw", "--use-fused-rmsnorm"]
    args = parse_args(["--device", "npu", *flags])
    assert args.mindspeed_flags == flags
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "npu", *flags, "--no-such-flag", "3"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag 3" in capsys.readouterr().err
    for device in ("cpu", "cuda"):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--device", device, *flags])
        assert exc.value.code == 2
        assert "unrecognized arguments: --optimizer-selection fused_adamw --use-fused-rmsnorm" in \
            capsys.readouterr().err


def _logged_loss_under_mindspeed_all_reduce(local_loss: float) -> float:
    import functools

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from megatron_video.parallel.initialize import initialize_parallel
    from megatron_video.training.loop import _mean_over

    original = dist.all_reduce

    @functools.wraps(original)
    def mindspeed_all_reduce(tensor, *args, **kwargs):  # the contract of MindSpeed's float64 bypass
        if torch.is_tensor(tensor) and tensor.dtype == torch.float64:
            handle = original(tensor.float(), *args, **kwargs)
            if handle is not None:
                handle.wait()
            return None
        return original(tensor, *args, **kwargs)

    initialize_parallel()
    dist.all_reduce = mindspeed_all_reduce
    try:
        return _mean_over(local_loss + dist.get_rank(), mpu.get_data_parallel_group(), torch.device("cpu"))
    finally:
        dist.all_reduce = original


@pytest.mark.slow
def test_logged_loss_is_the_dp_mean_under_mindspeeds_all_reduce():
    # DP 2, local losses 1.0 and 2.0: the mean is 1.5 on both ranks (a local value / DP would give 0.5 and 1.0)
    assert run_distributed(_logged_loss_under_mindspeed_all_reduce, 2, 1.0) == [1.5, 1.5]
