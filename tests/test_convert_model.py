"""Models built from converted checkpoints: the golden vector imported through the CLI and run at TP = 2
(dist and legacy), TP = 2 equals TP = 1 from one imported checkpoint, and `load_checkpoint` of the training
loop reads an imported dist checkpoint at TP = 1 (one process and two) and TP = 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints_convert.cli import main
from checkpoints_convert.schema import released_schema
from checkpoints_convert.synthetic import write_random_released
from megatron_video.models.suv_mmdit import suv_config
from tests.harness import run_distributed

GOLDEN = "suv_tiny_L2-2-2_S1-2-1_fp32.safetensors"


def _inputs(cfg) -> dict[str, torch.Tensor]:
    """Batch 2, latent 3 x 6 x 4 (skiparse and sequence-parallel padding), 7 text tokens with padding."""
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 3, 6, 4, dtype=torch.long)
    mask[1, 2, :, 2:] = 0
    text_mask = torch.ones(2, 1, 7, dtype=torch.long)
    text_mask[1, 0, 5:] = 0
    return {"hidden_states": torch.randn(2, cfg.in_channels, 3, 6, 4, generator=g),
            "timestep": torch.tensor([250.0, 731.5]),
            "encoder_hidden_states": torch.randn(2, 1, 7, cfg.caption_channels, generator=g),
            "pooled_projections": torch.randn(2, 1, cfg.pooled_projection_dim, generator=g),
            "attention_mask": mask, "encoder_attention_mask": text_mask}


def run_loaded(preset: str, inputs: dict, dist_root: str | None, legacy_root: str | None,
               variants: list[tuple[int, bool]]) -> list[torch.Tensor]:
    """For each (tp, sequence_parallel): build the model, load the dist checkpoint through the training
    loop's `load_checkpoint` (or this rank's legacy file), run `inputs`."""
    from megatron.core import parallel_state as mpu

    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.state_dict_adapter import from_released
    from megatron_video.parallel import initialize_parallel
    from megatron_video.training.checkpointing import load_checkpoint, model_sharded_state_dict

    cfg, outputs = suv_config(preset), []
    for tp, sp in variants:
        initialize_parallel(tensor_model_parallel_size=tp)
        model = SUVMMDiT(cfg, megatron_config(cfg, tensor_model_parallel_size=tp, sequence_parallel=sp,
                                              params_dtype=torch.float32, use_cpu_initialization=True))
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))  # every value must come from the checkpoint
        if dist_root is not None:
            iteration, loaded, common = load_checkpoint(
                dist_root, lambda m=model: {"model": model_sharded_state_dict(m)})
            assert iteration == 0 and common["train"]["iteration"] == 0
            model.load_state_dict(loaded["model"], strict=True)
        else:
            rank = mpu.get_tensor_model_parallel_rank()
            path = Path(legacy_root) / f"iter_0000000/mp_rank_{rank:02d}/model_optim_rng.pt"
            state = torch.load(path, weights_only=True)["model"]
            model.load_state_dict(from_released(state, cfg), strict=True)
        with torch.no_grad():
            outputs.append(model(**inputs))
    return outputs


def _moderate_weights(path: Path, cfg) -> Path:
    """Released-schema fp32 weights with moderate activations: 0.3·N(0,1), norm weights around 1."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    weights = {}
    for key, shape in released_schema(cfg).items():
        if shape is not None:
            is_norm_weight = len(shape) == 1 and key.endswith(".weight") and "norm" in key
            weights[key] = (1.0 if is_norm_weight else 0.0) + 0.3 * torch.randn(shape, generator=g)
    save_file(weights, path)
    return path


@pytest.mark.slow
def test_golden_imported_through_cli_at_tp2(golden_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    golden = load_file(golden_dir / GOLDEN)
    inputs = {k.removeprefix("inputs."): v for k, v in golden.items() if k.startswith("inputs.")}
    src = golden_dir / GOLDEN
    assert main([
        "import", str(src), str(tmp_path / "dist"), "--prefix", "state_dict.", "--preset", "tiny"]) == 0
    assert main(["import", str(src), str(tmp_path / "leg"), "--prefix", "state_dict.", "--preset", "tiny",
                 "--format", "legacy", "--tp", "2"]) == 0
    variants = [(2, False), (2, True)]
    per_rank = run_distributed(run_loaded, 2, "tiny", inputs, str(tmp_path / "dist"), None, variants)
    per_rank += run_distributed(run_loaded, 2, "tiny", inputs, None, str(tmp_path / "leg"), variants)
    for outputs in per_rank:
        for out in outputs:
            assert out.shape == golden["output"].shape
            assert (out - golden["output"]).abs().max().item() <= 1e-5


def test_dist_import_loads_in_one_process_at_tp1(tp1, tmp_path: Path) -> None:
    cfg = suv_config("small")
    src = write_random_released(tmp_path / "w.safetensors", cfg, dtype=torch.float32)
    assert main(["import", str(src), str(tmp_path / "dist"), "--preset", "small"]) == 0
    (out,) = run_loaded("small", _inputs(cfg), str(tmp_path / "dist"), None, [(1, False)])
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_imported_checkpoint_tp2_equals_tp1(tmp_path: Path) -> None:
    cfg = suv_config("small")
    src = _moderate_weights(tmp_path / "w.safetensors", cfg)
    assert main(["import", str(src), str(tmp_path / "dist"), "--preset", "small"]) == 0
    per_rank = run_distributed(run_loaded, 2, "small", _inputs(cfg), str(tmp_path / "dist"), None,
                               [(1, False), (2, False), (2, True)])
    for tp1_out, tp2_out, tp2_sp_out in per_rank:
        assert torch.isfinite(tp1_out).all()
        torch.testing.assert_close(tp2_out, tp1_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tp2_sp_out, tp1_out, rtol=1e-5, atol=1e-5)
