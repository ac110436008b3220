"""tools/tune_parallel: parameter counts, the activation-memory model against measured saved tensors, the
communication formulas, the enumeration and ranking, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
from megatron_video.models.suv_mmdit.config import megatron_config
from megatron_video.planning.cluster import ClusterSpec, cluster_from
from megatron_video.planning.cost import Layout, cp_block_bytes, cp_wire_bytes, step_time
from megatron_video.planning.memory import (
    GIB,
    Tokens,
    activation_peak_bytes,
    backward_workspace_bytes,
    model_state_bytes,
)
from megatron_video.planning.planner import estimate, launch_flags, plan
from megatron_video.planning.probe import SavedTensorMeter
from megatron_video.planning.tune_cli import main
from megatron_video.planning.workload import VideoShape, model_params, pipeline_split, skips_crossing, stage_params

REPO = Path(__file__).resolve().parents[1]
BIG = suv_config("osp-v1.5-8.5b")




def _build(cfg, recompute: str, dtype=torch.bfloat16) -> SUVMMDiT:
    flags = {"full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
             "selective": dict(recompute_granularity="selective", recompute_modules=["mlp"]),  # the FFN half
             "none": {}}[recompute]
    return SUVMMDiT(cfg, megatron_config(cfg, params_dtype=dtype, use_cpu_initialization=True, **flags))


@pytest.mark.parametrize("overrides", [{}, {"build_last_block_text_modules": True}, {"condition_channels": 12},
                                       {"num_layers": (1, 3, 1), "sparse_n": (1, 2, 1), "skip_connection": False}])
def test_parameter_count_matches_the_built_model(tp1, overrides) -> None:
    cfg = suv_config("small", **overrides)
    model = _build(cfg, "none")
    assert model_params(cfg).total == sum(p.numel() for p in model.parameters())
    assert sum(c.total for c in stage_params(cfg, 3)) == model_params(cfg).total


# ---------------------------------------------------------------------------------- the activation model


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("batch, latent, text", [(2, (3, 6, 10), 7), (1, (5, 8, 16), 12)])
def test_activation_model_matches_measured_saved_tensors(tp1, recompute, batch, latent, text) -> None:
    """Peak live bytes autograd holds over forward + backward (recompute included), measured on CPU in bf16,
    against the planner's prediction: within 15 % (the shapes include skiparse padding for k = 2 and 4)."""
    torch.manual_seed(0)
    cfg = suv_config("small", head_dim=32)
    model = _build(cfg, recompute)
    t, h, w = latent
    dt = torch.bfloat16
    inputs = dict(
        hidden_states=torch.randn(batch, cfg.in_channels, t, h, w, dtype=dt), timestep=torch.rand(batch) * 1000,
        encoder_hidden_states=torch.randn(batch, 1, text, cfg.caption_channels, dtype=dt),
        pooled_projections=torch.randn(batch, 1, cfg.pooled_projection_dim, dtype=dt),
        attention_mask=torch.ones(batch, t, h, w), encoder_attention_mask=torch.ones(batch, 1, text),
    )
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        model(**inputs).float().sum().backward()
    assert meter.live == 0  # everything saved was released by backward
    predicted = activation_peak_bytes(cfg, cfg.block_specs(), Tokens(t * h * w // 4, text), batch, recompute)
    assert abs(predicted / meter.peak - 1) < 0.15, (predicted, meter.peak)


def test_activation_model_orders_recompute_modes_and_scales_with_tp() -> None:
    tok = Tokens(36864, 512)
    specs = BIG.block_specs()
    none, sel, full = (activation_peak_bytes(BIG, specs, tok, 1, m) for m in ("none", "selective", "full"))
    assert none > sel > full
    tp4 = activation_peak_bytes(BIG, specs, Tokens(36864, 512, tp=4, sequence_parallel=True), 1, "none")
    assert none / 4 < tp4 < none / 2  # the gathered q/k/v input is not split
    ws1 = backward_workspace_bytes(BIG, specs, tok, 1)
    assert backward_workspace_bytes(BIG, specs, Tokens(36864, 512, tp=4, sequence_parallel=True), 1) == \
        pytest.approx(ws1 / 4, rel=0.01)
    assert 0 < ws1 < full < none


def test_model_states_follow_6_plus_12_over_dp() -> None:
    params = model_params(BIG)
    for dp in (1, 8, 64):
        states = model_state_bytes(params, 1, dp)
        assert states.weights + states.grads + states.optimizer == pytest.approx(params.total * (6 + 12 / dp))
        assert states.ema == pytest.approx(4 * params.total / dp)
    assert model_state_bytes(params, 1, 64, ema_replicated=True).ema == pytest.approx(4 * params.total)
    # TP splits only the split part; replicated norms/embeddings stay whole
    assert model_state_bytes(params, 4, 1).weights == pytest.approx(2 * (params.split / 4 + params.replicated))


# ------------------------------------------------------------------------------------------ shapes, PP, CP


def test_video_shape_to_tokens() -> None:
    shape = VideoShape.parse("121x576x1024")
    assert shape.latent_thw() == (16, 72, 128)
    assert shape.video_tokens() == 16 * 36 * 64
    for bad in ("120x576x1024", "121x570x1024", "121x576"):
        with pytest.raises(ValueError):
            VideoShape.parse(bad)


def test_pipeline_split_and_long_skips() -> None:
    assert pipeline_split(32, 3) == [11, 11, 10]
    with pytest.raises(ValueError):
        pipeline_split(32, 33)
    assert skips_crossing(BIG, 1) == []
    # the U-shape: every skip pair straddles the middle boundary, none crosses the outermost ones
    assert skips_crossing(BIG, 2) == [3]
    specs = BIG.block_specs()
    first_skip_out = min(s.index for s in specs if s.skip_out)
    assert skips_crossing(BIG, 32)[:first_skip_out] == [0] * first_skip_out


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_cp_bytes_reduce_to_the_ulysses_formula(cp: int) -> None:
    b, s, h, e = 2, 4096, 3072, 2
    local = s // cp
    assert cp_block_bytes(cp, 0, cp, 1, local, h, b) == pytest.approx(8 * b * s * h * e * (cp - 1) / cp ** 2)


@pytest.mark.parametrize("cp", [2, 4])
def test_planned_cp_traffic_matches_the_ulysses_formula(cp: int) -> None:
    """The CP engineer's traffic plan (what the model sends) against the closed form: per block the q/k/v/out
    all-to-alls plus the text-head gather/scatter, for plain Ulysses."""
    grid, text, h = (8, 18, 32), 512, BIG.hidden_size
    blocks, _ = cp_wire_bytes(BIG, cp, 1, grid, text, "ulysses")
    n = grid[0] * grid[1] * grid[2]
    formula = cp_block_bytes(cp, 0.0, cp, 1, n // cp, h, 1)
    text_heads = 2 * text * h * 2 * (cp - 1) / cp
    for spec, sent in zip(BIG.block_specs(), blocks):
        assert sent == pytest.approx(formula + (0 if spec.context_pre_only else text_heads))


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_skiparse_cp_moves_less_than_ulysses(cp: int) -> None:
    grid = (16, 36, 64)
    skiparse, ulysses = (sum(cp_wire_bytes(BIG, cp, 1, grid, 512, s)[0]) for s in ("skiparse", "ulysses"))
    assert skiparse < ulysses
    cluster = cluster_from("ascend-910b-64g", num_devices=64)
    local = model_params(BIG).per_rank(1)
    times = [step_time(BIG, Layout(1, cp, 1, 64 // cp, 1, "none", s), grid, 512, 64, cluster, local).cp_comm
             for s in ("skiparse", "ulysses")]
    assert 0 < times[0] < times[1]


def test_tp_comm_and_dp_comm_in_step_time() -> None:
    cluster = cluster_from("ascend-910b-64g", num_devices=64)
    local = model_params(BIG).per_rank(1)
    grid = (8, 18, 32)
    one = step_time(BIG, Layout(1, 1, 1, 64, 1, "full"), grid, 512, 64, cluster, local)
    assert one.tp_comm == 0 and one.cp_comm == 0 and one.bubble == 0
    two = step_time(BIG, Layout(2, 1, 1, 32, 1, "full"), grid, 512, 64, cluster, model_params(BIG).per_rank(2))
    assert two.tp_comm > 0 and two.dp_comm < one.dp_comm
    pp = step_time(BIG, Layout(1, 1, 4, 16, 1, "none"), grid, 512, 64, cluster, local)
    assert pp.bubble == pytest.approx(3 * (pp.compute + pp.tp_comm + pp.cp_comm) / 4)  # (p-1)/m of the m slots


# ------------------------------------------------------------------------------------------------ planner


def _cluster(**changes) -> ClusterSpec:
    return cluster_from("ascend-910b-64g", num_devices=64, **changes)


def test_plan_ranks_fitting_valid_layouts() -> None:
    shape = VideoShape.parse("57x288x512")
    result = plan(BIG, shape, 128, _cluster())
    assert result.ranked
    times = [e.time.total for e in result.ranked]
    assert times == sorted(times)
    for e in result.ranked:
        lay = e.layout
        assert lay.world == 64 and e.memory <= 64 * GIB
        assert BIG.num_heads % (lay.tp * lay.cp) == 0 and 128 % (lay.dp * lay.micro_batch) == 0
    assert result.too_big and all(e.memory > 64 * GIB for e in result.too_big)
    bigger = plan(BIG, shape, 128, _cluster(memory_gib=96.0))
    assert {e.layout for e in result.ranked} < {e.layout for e in bigger.ranked}


def test_best_layout_flags_are_accepted_by_the_trainer() -> None:
    from megatron_video.arguments import build_parser, validate_args

    result = plan(BIG, VideoShape.parse("121x288x512"), 256, _cluster())
    for est in result.ranked[:5]:
        args = build_parser().parse_args(launch_flags(est, 256, "npu"))
        validate_args(args, world_size=64, num_heads=BIG.num_heads)
        assert args.tensor_model_parallel_size == est.layout.tp and args.micro_batch_size == est.layout.micro_batch


@pytest.mark.parametrize("shape, batch, tp, mbs", [("57x288x512", 1024, 2, 2), ("121x288x512", 1024, 4, 4),
                                                     ("121x576x1024", 512, 4, 1)])
def test_report_layouts_fit_on_512_ascend_64g(shape, batch, tp, mbs) -> None:
    """The report's video-stage choices (DESIGN §13) fit in 64 GB per device in the model, with the FFN-half
    recompute of the training fork."""
    cluster = cluster_from("ascend-910b-64g", num_devices=512)
    lay = Layout(tp, 1, 1, 512 // tp, mbs, "selective")
    assert estimate(BIG, VideoShape.parse(shape), batch, cluster, lay).fits


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="recompute"):
        plan(BIG, VideoShape.parse("57x288x512"), 64, _cluster(), recompute=("some",))
    with pytest.raises(ValueError, match="pin"):
        plan(BIG, VideoShape.parse("57x288x512"), 64, _cluster(), fixed={"dp": 2})
    with pytest.raises(ValueError, match="whole number"):
        ClusterSpec(num_devices=12, devices_per_node=8)


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_stage_table_and_json(capsys) -> None:
    stages = str(REPO / "examples" / "opensoraplan1.5" / "stages.yaml")
    assert main(["--stages", stages, "--stage", "video4", "--devices", "64", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "36864 video + 512 text tokens" in out and "best: --device npu" in out and "env:  TP=" in out
    assert main(["--preset", "osp-v1.5-8.5b", "--shape", "57x288x512", "--global-batch-size", "64", "--devices",
                 "16", "--tp", "2", "--json", "--top", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ranked"] and all(r["tp"] == 2 for r in data["ranked"])
    assert "--tensor-model-parallel-size" in data["ranked"][0]["flags"]


def test_cli_errors_are_clear(tmp_path) -> None:
    with pytest.raises(SystemExit, match="frames"):
        main(["--shape", "60x288x512", "--global-batch-size", "8", "--devices", "8"])
    with pytest.raises(SystemExit, match="num_devices"):
        main(["--shape", "57x288x512", "--global-batch-size", "8"])
    with pytest.raises(SystemExit, match="not found"):
        main(["--model-config", str(tmp_path / "nope.yaml"), "--shape", "57x288x512", "--global-batch-size", "8",
              "--devices", "8"])


def _tp_memory_worker(recompute: str) -> tuple[int, float, int]:
    """Rank-local measured peak of saved activations at TP = 2 with Megatron-SP, and the model's prediction."""
    from megatron_video.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(0)
    cfg = suv_config("small", head_dim=32)
    flags = {"full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
             "selective": dict(recompute_granularity="selective", recompute_modules=["mlp"]),  # the FFN half
             "none": {}}[recompute]
    model = SUVMMDiT(cfg, megatron_config(cfg, tensor_model_parallel_size=2, sequence_parallel=True,
                                          params_dtype=torch.bfloat16, use_cpu_initialization=True, **flags))
    b, (t, h, w), text, dt = 2, (3, 6, 10), 7, torch.bfloat16
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        out = model(torch.randn(b, cfg.in_channels, t, h, w, dtype=dt), torch.rand(b) * 1000,
                    torch.randn(b, 1, text, cfg.caption_channels, dtype=dt),
                    torch.randn(b, 1, cfg.pooled_projection_dim, dtype=dt), torch.ones(b, t, h, w),
                    torch.ones(b, 1, text))
        out.float().sum().backward()
    tok = Tokens(t * h * w // 4, text, tp=2, sequence_parallel=True)
    return meter.peak, activation_peak_bytes(cfg, cfg.block_specs(), tok, b, recompute), meter.live


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_activation_model_under_tp2_sequence_parallel(recompute: str) -> None:
    from tests.harness import run_distributed

    for peak, predicted, live in run_distributed(_tp_memory_worker, 2, recompute, timeout=300):
        assert live == 0
        assert abs(predicted / peak - 1) < 0.15, (predicted, peak)
