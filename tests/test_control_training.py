"""pretrain_control.py: the structure controller trained on a frozen base through the shared training loop.

Two TP2 + Megatron-SP ranks train a few steps from a released-format base and a feature cache holding canny
signals: the base stays bit-identical to what was loaded, the loss is finite, the controller moves, the
checkpoints hold only the controller (+ its optimizer state and EMA) and a record of the base. A run resumed
from the iteration-2 checkpoint (copied into a fresh directory, as a run killed after that save leaves it)
ends with a checkpoint bitwise equal to the uninterrupted run's. The export round trip, the cached signal and
the refusals are checked in-process.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron_video.training.checkpointing import TRACKER, iteration_dir
from tests.harness import run_distributed
from tests.training_fixtures import ITERATION_LINE, checkpoint_tensors, same_values

CONTROL = ["--structure-signal", "canny", "--control-temporal-downsample", "8", "--control-spatial-downsample", "8",
           "--control-blocks", "1", "--control-conv-channels", "8"]  # the stub VAE: 8x in time and space


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tp1) -> Path:
    """Sample videos -> feature cache (stub encoders + canny signals) -> configs; a released-format base of the
    small preset (our initialisation, so the loss is sane)."""
    from safetensors.torch import save_file

    from megatron_video.arguments import parse_args
    from megatron_video.control.signals import signal_extractor
    from megatron_video.data.cache_builder import build_cache, merge_index, stub_encoders
    from megatron_video.data.config import DataConfig
    from megatron_video.data.dataset import VideoDataset
    from megatron_video.models.suv_mmdit import SUVMMDiT, megatron_config
    from megatron_video.models.suv_mmdit.state_dict_adapter import to_released
    from tests.data_fixtures import make_sample_dataset

    root = tmp_path_factory.mktemp("control")
    data = {"metadata_paths": [str(make_sample_dataset(root / "data", num_videos=6, num_images=0) / "data.txt")],
            "shape": {"resolution_mode": "forced", "height": 32, "width": 32, "num_frames": 9, "min_num_frames": 9,
                      "fps": 8}, "num_workers": 0}
    (root / "decode.yaml").write_text(yaml.safe_dump(data))
    video, text = stub_encoders()
    build_cache(VideoDataset.from_config(DataConfig.from_dict(data).validate()), root / "cache", video, text,
                structure=signal_extractor("canny"), structure_kind="canny")
    assert merge_index(root / "cache")
    (root / "data.yaml").write_text(yaml.safe_dump({**data, "cache_path": str(root / "cache")}))
    (root / "model.yaml").write_text(yaml.safe_dump({"preset": "small", "caption_channels": 16,
                                                     "pooled_projection_dim": 8}))
    cfg = parse_args(["--model-config", str(root / "model.yaml")]).model_config
    base = SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True), init_seed=3)
    state = {k: v.contiguous() for k, v in base.state_dict().items() if isinstance(v, torch.Tensor)}
    save_file(to_released(state, cfg), str(root / "base.safetensors"))
    return root


def _argv(root: Path, save: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", "--model-config", str(root / "model.yaml"), "--data-config", str(root / "data.yaml"),
            "--base", str(root / "base.safetensors"), *CONTROL, "--train-iters", "4", "--global-batch-size", "2",
            "--micro-batch-size", "1", "--lr", "1e-3", "--lr-decay-style", "constant", "--log-interval", "1",
            "--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer",
            "--ema-decay", "0.9", "--save", str(save), "--save-interval", "2", "--distributed-timeout-minutes", "1",
            *extra]


def _train(argv: list[str]) -> dict:
    """pretrain_control.py's pretrain() call on this rank, watching the module its wrap hook builds."""
    from megatron_video.control import training as control
    from megatron_video.training.loop import pretrain

    seen = {}

    def wrap(args, denoiser):
        wrapped = control.control_wrap(args, denoiser)
        seen["module"] = wrapped.module
        seen["base"] = {k: v.clone() for k, v in wrapped.module.base.state_dict().items() if v is not None}
        seen["controller"] = {k: v.clone() for k, v in wrapped.module.controller.state_dict().items() if v is not None}
        return wrapped

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = pretrain(argv, control.control_inputs, control.add_control_args, setup=control.control_setup,
                        wrap=wrap)
    module = seen["module"]
    after_base, after_ctrl = module.base.state_dict(), module.controller.state_dict()
    return {"code": code, "log": log.getvalue(),
            "base_changed": [k for k, v in seen["base"].items() if not torch.equal(after_base[k], v)],
            "controller_changed": [k for k, v in seen["controller"].items() if not torch.equal(after_ctrl[k], v)],
            "patch_embed": after_base["patch_embed.proj.weight"].clone() if module.pre_process else None}


@pytest.fixture(scope="module")
def trained(setup: Path) -> tuple[Path, list[dict]]:
    save = setup / "uninterrupted"
    return save, run_distributed(_train, 2, _argv(setup, save), timeout=240)


@pytest.mark.slow
def test_trains_only_the_controller(setup: Path, trained):
    from safetensors.torch import load_file

    save, ranks = trained
    for rank in ranks:
        assert rank["code"] == 0, rank["log"][-3000:]
        assert rank["base_changed"] == []  # bit-identical to the loaded base
        assert "projector.linears.0.weight" in rank["controller_changed"]
        assert "encoder.conv_in.weight" in rank["controller_changed"]
    losses = {int(m[1]): float(m[2]) for m in ITERATION_LINE.finditer(ranks[-1]["log"])}  # the last rank logs
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(list(losses.values())))), losses
    assert torch.equal(ranks[0]["patch_embed"], load_file(str(setup / "base.safetensors"))["patch_embed.proj.weight"])
    saved = checkpoint_tensors(iteration_dir(save, 4), setup / "saved.pt")
    weights = [k for k in saved if k.startswith(("model.", "ema."))]
    assert weights and all(k.split(".")[1] == "controller" for k in weights)  # the base is never re-saved
    assert {k.split(".")[0] for k in saved} == {"model", "ema", "optimizer", "rng_state"}


@pytest.mark.slow
def test_exact_resume(setup: Path, trained, tmp_path: Path):
    save, _ = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(iteration_dir(save, 2), iteration_dir(resumed, 2))
    (resumed / TRACKER).write_text("2\n")
    ranks = run_distributed(_train, 2, _argv(setup, resumed, "--load", str(resumed)), timeout=240)
    assert ranks[0]["code"] == 0, ranks[0]["log"][-3000:]
    assert "continuing at iteration 2" in ranks[0]["log"]
    want = checkpoint_tensors(iteration_dir(save, 4), tmp_path / "want.pt")
    got = checkpoint_tensors(iteration_dir(resumed, 4), tmp_path / "got.pt")
    assert sorted(got) == sorted(want)
    different = [key for key in want if not same_values(want[key], got[key])]
    assert not different, different[:10]


@pytest.mark.slow
def test_pipeline_and_context_parallel_checkpoints_resume_exactly(setup: Path, tmp_path: Path):
    """PP2 x CP2 (four ranks) with a narrower encoder: each stage saves its own projectors (the encoder lives on
    the first), R crosses the stages zero-padded in the carry, and a run resumed from iteration 2 ends bitwise
    where the uninterrupted run ends; the export gathers every stage's tensors into one loadable file. Both runs
    sample at iteration 4 under --sample-structure-video through the same layout (decoded by a tiny WF-VAE that,
    like the stub encoder the cache was built with, folds 8 frames and 8x8 pixels), and the last rank logs it."""
    from safetensors.torch import save_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_video.arguments import parse_args
    from megatron_video.control.export import export_controller, load_controller_weights, read_controller_file
    from megatron_video.models.control import ControlledSUV
    from megatron_video.models.suv_mmdit import SUVMMDiT, megatron_config
    from tests.inpaint_fixtures import TINY_VAE, tiny_vae

    save_file({k: v.contiguous() for k, v in tiny_vae().state_dict().items()}, str(tmp_path / "vae.safetensors"))
    (tmp_path / "vae.json").write_text(json.dumps(TINY_VAE))
    edges = torch.zeros(1, 9, 32, 32, dtype=torch.uint8)
    edges[..., 8:24, 8] = edges[..., 8:24, 23] = edges[..., 8, 8:24] = edges[..., 23, 8:24] = 255  # a square
    save_file({"structure": edges}, str(tmp_path / "structure.safetensors"))
    (tmp_path / "prompts.txt").write_text("A red square.\n")
    sampling = ["--sample-interval", "4", "--sample-prompts", str(tmp_path / "prompts.txt"), "--sample-encoders",
                "stub", "--sample-num-steps", "2", "--sample-shape", "9,32,32", "--vae-path",
                str(tmp_path / "vae.safetensors"), "--vae-config", str(tmp_path / "vae.json"),
                "--sample-structure-video", str(tmp_path / "structure.safetensors")]

    def argv(save: Path, *extra: str) -> list[str]:
        out = _argv(setup, save, "--pipeline-model-parallel-size", "2", "--context-parallel-size", "2",
                    "--control-hidden-size", "32", *sampling, "--tensorboard-dir", str(save / "tb"), *extra)
        at = out.index("--tensor-model-parallel-size")
        return [a for a in out[:at] + out[at + 2:] if a != "--sequence-parallel"]  # TP1, no SP

    save = tmp_path / "uninterrupted"
    ranks = run_distributed(_train, 4, argv(save), timeout=300)
    for rank in ranks:
        assert rank["code"] == 0, rank["log"][-3000:]
        assert rank["base_changed"] == [] and "projector.linears" in " ".join(rank["controller_changed"])
    log = ranks[0]["log"]
    assert "sampled 1 prompt(s) at iteration 4 (model weights, canny structure)" in log, log[-3000:]
    events = EventAccumulator(str(save / "tb"), size_guidance={"images": 0}).Reload()
    assert [image.step for image in events.Images("samples/00")] == [4]
    from PIL import Image, ImageSequence

    gif = Image.open(io.BytesIO(events.Images("samples/00")[0].encoded_image_string))
    assert [frame.size for frame in ImageSequence.Iterator(gif)] == [(32, 32)] * 9  # the sample shape, decoded
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(iteration_dir(save, 2), iteration_dir(resumed, 2))
    (resumed / TRACKER).write_text("2\n")
    ranks = run_distributed(_train, 4, argv(resumed, "--load", str(resumed)), timeout=300)
    assert ranks[0]["code"] == 0 and "continuing at iteration 2" in ranks[0]["log"], ranks[0]["log"][-3000:]
    want = checkpoint_tensors(iteration_dir(save, 4), tmp_path / "want.pt")
    got = checkpoint_tensors(iteration_dir(resumed, 4), tmp_path / "got.pt")
    assert sorted(got) == sorted(want)
    assert [key for key in want if not same_values(want[key], got[key])] == []
    cfg = parse_args(["--model-config", str(setup / "model.yaml")]).model_config
    _, control, tensors = read_controller_file(export_controller(save, tmp_path / "ctrl.safetensors", "ema"))
    assert control.hidden_size == 32 and tensors["encoder.blocks.0.qkv.weight"].shape == (3 * 32, 32)
    assert {f"projector.linears.{j}.weight" for j in range(cfg.num_blocks)} <= tensors.keys()  # both stages
    fresh = ControlledSUV(SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32,
                                                        use_cpu_initialization=True), init_seed=5), control)
    load_controller_weights(fresh.controller, tensors)


@pytest.mark.slow
def test_export_round_trip(setup: Path, trained, tmp_path: Path):
    """The exported model and EMA controllers load into fresh controllers that compute what the checkpoint's
    weights compute (bitwise: the same full tensors in the same modules)."""
    from megatron_video.arguments import parse_args
    from megatron_video.control.export import export_controller, load_controller_weights, read_controller_file
    from megatron_video.models.control import ControlledSUV
    from megatron_video.models.suv_mmdit import SUVMMDiT, megatron_config
    from tests.cp_fixtures import make_inputs

    save, _ = trained
    saved = checkpoint_tensors(iteration_dir(save, 4), tmp_path / "saved.pt")
    cfg = parse_args(["--model-config", str(setup / "model.yaml")]).model_config
    config = megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True)
    batch = make_inputs(cfg, (2, 4, 4), 1)
    del batch["target"]
    structure = torch.rand(2, 1, 9, 32, 32)
    outputs = {}
    for weights in ("model", "ema"):
        path = export_controller(save, tmp_path / f"{weights}.safetensors", weights)
        metadata, control, tensors = read_controller_file(path)
        assert metadata["signal"] == "canny" and metadata["weights"] == weights and metadata["iteration"] == "4"
        assert all(name.startswith(("control_encoder.", "control_projector.")) for name in _names(path))
        fresh = ControlledSUV(SUVMMDiT(cfg, config, init_seed=5), control)
        load_controller_weights(fresh.controller, tensors)
        direct = ControlledSUV(SUVMMDiT(cfg, config, init_seed=5), control)
        prefix = f"{weights}.controller."
        direct.controller.load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)},
                                          strict=False)
        with torch.no_grad():
            outputs[weights] = fresh(**batch, structure=structure)
            assert torch.equal(outputs[weights], direct(**batch, structure=structure))
    assert not torch.equal(outputs["model"], outputs["ema"])


def _names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_cached_signal_equals_the_online_signal(setup: Path):
    """The cache stores exactly what online training computes from the decoded video (epoch 0's crop)."""
    from megatron_video.control.signals import from_levels, signal_extractor
    from megatron_video.data.cache import FeatureCacheDataset
    from megatron_video.data.config import DataConfig
    from megatron_video.data.dataset import VideoDataset

    decode = DataConfig.from_dict(yaml.safe_load((setup / "decode.yaml").read_text())).validate()
    videos = VideoDataset.from_config(decode)
    cached = FeatureCacheDataset(setup / "cache", DataConfig.from_dict(yaml.safe_load(
        (setup / "data.yaml").read_text())).validate())
    extract = signal_extractor("canny")
    ids = [i for i in range(len(cached)) if cached.shape_keys[i] >= 0]
    assert len(ids) >= 4
    stored = [cached.load(sid, 0)["structure"] for sid in ids]
    for sid, signal in zip(ids, stored):
        online = extract(videos.load(sid, 0)["video"][None])[0]
        assert signal.dtype == torch.uint8 and torch.equal(signal, online), sid
    assert 0 < from_levels(torch.stack(stored)).mean() < 0.5  # edges found, not everywhere


def _preflight(capsys, argv: list[str]) -> str:
    from megatron_video.control.training import add_control_args, check_control_args
    from megatron_video.training.preflight import preflight

    with pytest.raises(SystemExit) as exit_info:
        preflight(argv, add_control_args, check_control_args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_refusals(setup: Path, tmp_path: Path, capsys, monkeypatch):
    from checkpoints_convert.synthetic import write_random_released
    from megatron_video.models.suv_mmdit import suv_config

    common = ["--device", "cpu", "--model-config", str(setup / "model.yaml"), "--data-config",
              str(setup / "data.yaml"), "--train-iters", "1", "--global-batch-size", "1", "--micro-batch-size", "1"]
    base = ["--base", str(setup / "base.safetensors")]
    assert "the following arguments are required: --base" in _preflight(capsys, [*common, "--structure-signal",
                                                                                 "canny"])
    assert "--base /nowhere: not found" in _preflight(capsys, [*common, "--base", "/nowhere", "--structure-signal",
                                                              "canny"])
    assert "invalid choice: 'edges'" in _preflight(capsys, [*common, *base, "--structure-signal", "edges"])
    other = write_random_released(tmp_path / "tiny.safetensors", suv_config("tiny"))
    assert "does not match the model config" in _preflight(capsys, [*common, "--base", str(other),
                                                                    "--structure-signal", "canny"])
    assert "holds canny structure signal, --structure-signal is depth" in _preflight(
        capsys, [*common, *base, "--structure-signal", "depth"])
    canny = [*common, *base, "--structure-signal", "canny"]
    assert "must be a multiple of the base's head size" in _preflight(capsys, [*canny, "--control-hidden-size", "20"])
    from tests.inpaint_fixtures import TINY_VAE

    (tmp_path / "prompts.txt").write_text("A red square.\n")
    (tmp_path / "vae.json").write_text(json.dumps(TINY_VAE))
    sampling = [*canny, "--sample-interval", "2", "--sample-prompts", str(tmp_path / "prompts.txt"),
                "--sample-encoders", "stub", "--vae-config", str(tmp_path / "vae.json"),
                "--vae-path", str(tmp_path / "prompts.txt")]  # (the weights are only checked to exist)
    assert "needs --sample-structure-video" in _preflight(capsys, sampling)
    assert "the controller folds 4x in time and 8x in space (--control-*-downsample), the sampling VAE 8x and 8x" \
        in _preflight(capsys, [*sampling, "--sample-structure-video", str(tmp_path / "prompts.txt")])
    with monkeypatch.context() as env:
        env.setenv("WORLD_SIZE", "2")
        assert "heads do not split over --tensor-model-parallel-size 2" in _preflight(
            capsys, [*canny, "--control-hidden-size", "16", "--tensor-model-parallel-size", "2"])
    online = tmp_path / "online.yaml"
    online.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load((setup / "data.yaml").read_text()).items()
                                      if k != "cache_path"}))
    argv = [*common, "--data-config", str(online), *base, "--structure-signal", "depth", "--vae-path", str(online)]
    assert "needs its model from a local path (--structure-model), not given" in _preflight(capsys, argv)


@pytest.mark.slow
def test_resume_with_another_base_is_refused(setup: Path, trained, tmp_path: Path, capsys):
    """The pre-flight (one line, exit 2, before any process group or model) compares the base's fingerprint with
    the record in the checkpoint --load resumes from; a checkpoint that is no controller's is refused too."""
    save, _ = trained
    other = tmp_path / "other.safetensors"
    other.write_bytes((setup / "base.safetensors").read_bytes()[:-4] + b"\0\0\0\0")  # same shapes, other values
    argv = _argv(setup, tmp_path / "new", "--load", str(save))
    argv.remove("--sequence-parallel")  # one process: the pre-flight refuses before any parallel layout is needed
    tp = argv.index("--tensor-model-parallel-size")
    del argv[tp:tp + 2]
    argv[argv.index("--base") + 1] = str(other)
    err = _preflight(capsys, argv)
    assert f"--base {other} (fingerprint" in err and f"is not the base --load {save} was trained on" in err, err
    argv[argv.index("--base") + 1] = str(setup / "base.safetensors")
    argv[argv.index("--control-blocks") + 1] = "2"
    argv[argv.index("--save") + 1] = str(tmp_path / "new2")  # (the first check holds the lock on the first)
    err = _preflight(capsys, argv)
    assert f"--load {save} was trained with config" in err and "the --control-* flags give" in err, err


def structure_sampling_worker(root: Path) -> dict:
    """tools/sample.py under an exported controller (non-zero projectors): the structure video and the same signal
    given as a computed uint8 tensor sample the same latents; without the controller the sample differs."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from checkpoints_convert.synthetic import write_random_released
    from megatron_video.control.export import write_controller_file
    from megatron_video.control.signals import signal_extractor
    from megatron_video.models.control import ControlConfig, StructureController
    from megatron_video.models.registry import model_config_from_mapping
    from megatron_video.models.suv_mmdit import SUVMMDiT, megatron_config
    from megatron_video.parallel import initialize_parallel
    from megatron_video.sampling.cli import main, read_condition_video
    from megatron_video.sampling.video import write_mp4
    from tests.test_sample_tool import MODEL, _argv, _files

    initialize_parallel()  # to build the controller here (tools/sample.py builds its own groups again)
    files = _files(root)
    cfg = model_config_from_mapping(MODEL)
    write_random_released(root / "base.safetensors", cfg, last_block_text=False, dtype=torch.float32)
    control = ControlConfig(temporal_downsample=1, spatial_downsample=4, conv_channels=8, num_blocks=1)  # stand-in VAE
    torch.manual_seed(0)
    state = StructureController(control, SUVMMDiT(cfg, megatron_config(cfg, use_cpu_initialization=True))).state_dict()
    state = {k: (v.normal_(0.0, 0.02) if k.startswith("projector.") else v) for k, v in state.items() if v is not None}
    write_controller_file(root / "controller.safetensors", state, control, "canny")
    frames = np.zeros((9, 32, 32, 3), np.uint8)
    for t in range(9):
        frames[t, 8:24, 2 + 2 * t:12 + 2 * t] = 255  # a square moving right
    write_mp4(root / "structure.mp4", frames, 8.0)
    levels = signal_extractor("canny")(read_condition_video(str(root / "structure.mp4"), 9, 32, 32))[0]
    save_file({"structure": levels}, str(root / "structure.safetensors"))

    def run(name: str, *extra: str) -> torch.Tensor:
        code = main(_argv(files, "--released", str(root / "base.safetensors"), "--out", str(root / name), *extra))
        assert code == 0, name
        return load_file(str(root / name / "sample_0000.latents.safetensors"))["latents"]

    controlled = ["--controller", str(root / "controller.safetensors"), "--structure-video"]
    return {"video": run("video", *controlled, str(root / "structure.mp4")),
            "cached": run("cached", *controlled, str(root / "structure.safetensors")), "base": run("base"),
            "edges": float(levels.float().mean() / 255)}


@pytest.mark.slow
def test_sampling_with_an_exported_controller(tmp_path: Path):
    (result,) = run_distributed(structure_sampling_worker, 1, tmp_path, timeout=600)
    assert 0 < result["edges"] < 0.5
    assert torch.equal(result["video"], result["cached"])
    assert not torch.allclose(result["video"], result["base"])


def test_sampling_structure_inputs_are_checked_first(tmp_path: Path):
    from tests.test_sample_tool import _argv, _files, _main

    files = _files(tmp_path)
    (tmp_path / "base.safetensors").write_bytes(b"")  # never read: the checks come first
    argv = _argv(files, "--released", str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "o"))
    cases = {("--controller", str(files["prompts"])): "structure control needs both --controller and "
                                                         "--structure-video",
             ("--controller", str(files["prompts"]), "--structure-video", str(files["prompts"])):
                 f"--controller: {files['prompts']}: not a safetensors file"}
    for extra, message in cases.items():
        code, err = _main([*argv, *extra])
        assert code == 2 and message in err and "Traceback" not in err, err


def test_cache_tool_refuses_a_signal_without_its_model(setup: Path, tmp_path: Path, capsys):
    from megatron_video.tool_errors import run_tool
    from tests.data_fixtures import load_tool

    main = load_tool("cache_features").main
    argv = ["--data-config", str(setup / "decode.yaml"), "--out", str(tmp_path / "cache"), "--structure"]
    for kind, message in (("depth", "the depth signal needs its model from a local path (--structure-model), not "
                                    "given"), ("edges", "unknown structure signal 'edges'")):
        assert run_tool(main, [*argv, kind]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists()  # refused before anything is written


def _tiny_sketch(path: Path) -> Path:
    from safetensors.torch import save_file

    from tests.test_control_signals import _TinySketch

    torch.manual_seed(0)
    save_file(_TinySketch().state_dict(), str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["depth", "sketch"])
def test_depth_and_sketch_controllers_train_end_to_end(setup: Path, tmp_path: Path, kind: str):
    """The user's path for a model-based signal: tools/cache_features.py --structure KIND with the model from a
    local path, then pretrain_control.py on that cache (one rank): the controller trains, the base does not."""
    from megatron_video.tool_errors import run_tool
    from tests.data_fixtures import load_tool
    from tests.test_control_signals import tiny_dpt

    source = ["--structure-model", str(tiny_dpt(tmp_path / "dpt") if kind == "depth"
                                       else _tiny_sketch(tmp_path / "sketch.safetensors"))]
    if kind == "sketch":
        source += ["--structure-sketch-arch", "tests.test_control_signals:_TinySketch"]
    cache = tmp_path / "cache"
    assert run_tool(load_tool("cache_features").main, ["--data-config", str(setup / "decode.yaml"), "--out",
                                                       str(cache), "--structure", kind, *source]) == 0
    data = yaml.safe_load((setup / "decode.yaml").read_text())
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({**data, "cache_path": str(cache)}))
    argv = _argv(setup, tmp_path / "save", "--data-config", str(tmp_path / "data.yaml"), "--train-iters", "2",
                 "--structure-signal", kind, *source)
    for flag, count in (("--tensor-model-parallel-size", 2), ("--sequence-parallel", 1)):
        at = argv.index(flag)
        del argv[at:at + count]
    (rank,) = run_distributed(_train, 1, argv, timeout=240)
    assert rank["code"] == 0, rank["log"][-3000:]
    assert rank["base_changed"] == []
    assert "projector.linears.0.weight" in rank["controller_changed"]
    assert "encoder.conv_in.weight" in rank["controller_changed"]


def test_resume_accepts_records_written_before_later_controller_fields(tmp_path: Path, monkeypatch):
    """A checkpoint's control record from before `hidden_size` existed resumes with the default (full width) and
    is refused for another width: absent fields compare as their defaults."""
    import argparse

    from megatron_video.control import training as control
    from megatron_video.training import save_dir

    (tmp_path / "base.safetensors").write_bytes(b"weights")
    args = argparse.Namespace(base=str(tmp_path / "base.safetensors"), base_weights="ema", structure_signal="canny",
                              control_temporal_downsample=4, control_spatial_downsample=8, control_conv_channels=32,
                              control_blocks=2, control_hidden_size=None, load=str(tmp_path / "ckpt"))
    old = control.control_record(args)
    del old["config"]["hidden_size"]
    monkeypatch.setattr(save_dir, "resume_iteration", lambda load: 2)
    monkeypatch.setattr(control, "saved_record", lambda load: old)
    control.check_resume(args)
    args.control_hidden_size = 16
    with pytest.raises(ValueError, match="was trained with config"):
        control.check_resume(args)
