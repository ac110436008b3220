"""Megatron-LM's --overlap-grad-reduce / --overlap-param-gather / --ddp-bucket-size change when the data-parallel
collectives run, never what they compute: with the distributed optimizer, two training steps give the same
losses, gradients and updated weights with overlap on (small buckets: the reduce-scatters run asynchronously
during the backward, and each bucket group's all-gather waits for its first forward pre-hook) as with overlap off
(one bucket), at DP4, TP2 x DP2 and PP2 x DP2. On CPU the adaptor issues those all-gathers synchronously (gloo's
asynchronous coalesced one corrupts the heap: the last test here), at the same points.

Tolerance: 1e-5 of each tensor's largest entry (fp32 rounding). Every reduced element is the same sum over
the same DP ranks either way, but gloo's ring splits a bucket by its size, so the order of the additions (and
the last bits) depends on the bucket boundaries. Adam's eps is raised to 1e-4 so that the update is smooth in
the gradient: with eps ~ 0 a gradient entry of ~1e-12 gets an update of +-lr whatever its last bits.

The second step's forward runs on weights gathered by megatron's pre-forward hooks, so a module reading a
parameter before its owner is called (the bug `Modulation` had) makes the losses differ. Hooks and lazy
gather: megatron-core 0.16.1 distributed_data_parallel.py `_make_forward_pre_hook` (waits for
`module.parameters(recurse=False)` only) and distrib_optimizer.py `step_with_ready_grads` (no all-gather in the
step when overlap_param_gather)."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (TP, PP); DP = 4 / (TP x PP)
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "3000"]


def _batch(cfg, dp_rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + dp_rank)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return {
        "x0": torch.randn(2, cfg.in_channels, 2, 4, 6, generator=g),
        "t5_hidden": torch.randn(2, 6, cfg.caption_channels, generator=g),
        "t5_mask": mask,
        "clip_pooled": torch.randn(2, cfg.pooled_projection_dim, generator=g),
        "positions": [2 * dp_rank, 2 * dp_rank + 1],
    }


def _components(cfg, world_size: int, overlap: bool, train_iters: int, *extra: str, wrap=None):
    """A run's training components: the distributed optimizer, micro-batch 2, lr 1e-2 and Adam eps 1e-4 (see the
    module docstring), `extra` flags, and megatron's overlaps with small buckets or none."""
    from megatron_video.arguments import build_parser, validate_args
    from megatron_video.training.components import build_components

    args = build_parser().parse_args(["--use-distributed-optimizer", "--micro-batch-size", "2", "--lr", "1e-2",
                                      "--adam-eps", "1e-4", *extra, *(OVERLAP if overlap else [])])
    validate_args(args, world_size=world_size)
    return build_components(args, cfg, train_iters=train_iters, wrap=wrap)


def _forward_backward(parts, objective, batch: dict, step: int, prepare_inputs=None) -> list[float]:
    """One global batch (one micro-batch) through megatron's schedule with zeroed gradients; the losses this
    pipeline stage computes. The caller steps the optimizer."""
    from megatron_video.parallel.pipeline import batch_pipeline_shapes, run_forward_backward
    from megatron_video.training.loop import make_forward_step, t2v_inputs

    parts.model.zero_grad_buffer()
    parts.optimizer.zero_grad()
    recv, send = batch_pipeline_shapes(parts.module, [batch])
    losses = run_forward_backward(make_forward_step(objective, prepare_inputs or t2v_inputs, 0, step), iter([batch]),
                                  parts.model, 1, 2, recv, send)
    return [d["loss"].item() for d in losses]


def _assert_same_training(off: dict, on: dict, where: str = "") -> None:
    """Losses to 1e-6 and final weights to 1e-5 of each tensor's largest entry (module docstring)."""
    torch.testing.assert_close(on["losses"], off["losses"], rtol=1e-6, atol=0, msg=where or None)
    for name, weight in off["weights"].items():
        torch.testing.assert_close(on["weights"][name], weight, rtol=0, atol=1e-5 * float(weight.abs().max()),
                                   msg=f"{where}: weight {name}" if where else f"weight {name}")


def _reduced_grad_shards(parts) -> dict[str, tuple[int, int, torch.Tensor]]:
    """The gradient ranges this DP rank's distributed optimizer owns, after the reduce-scatter (elsewhere the
    grad buffer holds unreduced local values, and which ranges a rank owns depends on the buckets)."""
    from megatron_video.optim.adaptive_optimizer import leaf_optimizers

    names = {p: n for n, p in parts.module.named_parameters()}
    out = {}
    for opt in leaf_optimizers(parts.optimizer.optimizer):
        for param, (gbuf, dtype, bucket) in opt.model_param_gbuf_map.items():
            owned = opt.gbuf_ranges[gbuf][dtype][bucket]["param_map"][param]["param"]
            out[names[param]] = (owned.start, owned.end, param.main_grad.view(-1)[owned.start:owned.end].clone())
    return out


def _full_grads(records: list[dict]) -> dict[str, torch.Tensor]:
    """One model replica's reduced gradients, assembled from its DP ranks' owned ranges (each element once)."""
    sizes = {name: weight.numel() for name, weight in records[0]["weights"].items()}
    full = {name: torch.full((n,), float("nan")) for name, n in sizes.items()}
    for record in records:
        for name, (start, end, values) in record["grads"].items():
            assert torch.isnan(full[name][start:end]).all(), f"{name}[{start}:{end}] owned twice"
            full[name][start:end] = values
    return full


def overlap_worker(layouts: list[tuple[int, int]]) -> list[dict]:
    from megatron.core import parallel_state as mpu

    from megatron_video.diffusion import build_objective
    from megatron_video.models.suv_mmdit.config import suv_config
    from megatron_video.parallel import initialize_parallel, set_seed

    cfg = suv_config("tiny")
    objective = build_objective("rectified_flow")
    out = []
    for tp, pp in layouts:
        for overlap in (False, True):
            initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            set_seed(0)
            parts = _components(cfg, 4, overlap, 2, "--tensor-model-parallel-size", str(tp),
                                "--pipeline-model-parallel-size", str(pp), "--ema-decay", "0")
            dp_rank = mpu.get_data_parallel_rank()
            record = {"tp": tp, "pp": pp, "overlap": overlap, "losses": [], "buckets": len(parts.model.bucket_groups),
                      "model_rank": (mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank())}
            for step in range(2):
                record["losses"] += _forward_backward(parts, objective, _batch(cfg, dp_rank, step), step)
                if step == 1:
                    record["grads"] = _reduced_grad_shards(parts)
                parts.optimizer.step()
            parts.sync_params()
            record["weights"] = {n: p.detach().clone() for n, p in parts.module.named_parameters()}
            out.append(record)
    return out


@pytest.mark.slow
def test_overlap_on_equals_off():
    per_rank = run_distributed(overlap_worker, 4, LAYOUTS, timeout=600)
    for index, (tp, pp) in enumerate(LAYOUTS):
        off = [records[2 * index] for records in per_rank]
        on = [records[2 * index + 1] for records in per_rank]
        for a, b in zip(off, on, strict=True):  # per rank: bucketing, losses, updated weights
            where = f"TP{tp} PP{pp} model rank {a['model_rank']}"
            # overlap really ran with many buckets (megatron keeps one bucket on pipeline stages after the first)
            assert a["buckets"] == 1 and (b["buckets"] > 3 or a["model_rank"][1] > 0), where
            _assert_same_training(a, b, where)
        for model_rank in {r["model_rank"] for r in off}:  # per replica position: the reduced gradient
            grads_off = _full_grads([r for r in off if r["model_rank"] == model_rank])
            grads_on = _full_grads([r for r in on if r["model_rank"] == model_rank])
            for name, grad in grads_off.items():
                if torch.isnan(grad).all():
                    continue  # frozen (no gradient buffer)
                assert not torch.isnan(grad).any() and not torch.isnan(grads_on[name]).any(), name
                torch.testing.assert_close(grads_on[name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()),
                                           msg=f"TP{tp} PP{pp} {model_rank}: gradient of {name}")


def test_overlap_flags_follow_megatron() -> None:
    """Megatron-LM: store_true flags, default off; --overlap-param-gather needs the distributed optimizer and
    --overlap-grad-reduce (megatron/training/arguments.py validate_args); the bucket default is megatron-core's."""
    from megatron_video.arguments import ArgumentError, build_parser, validate_args

    parser = build_parser()
    args = parser.parse_args([])
    assert (args.overlap_grad_reduce, args.overlap_param_gather, args.ddp_bucket_size) == (False, False, None)
    for argv in (["--overlap-param-gather", "--overlap-grad-reduce"],
                 ["--overlap-param-gather", "--use-distributed-optimizer"],
                 ["--overlap-grad-reduce", "--clip-grad-rank-discard"]):
        with pytest.raises(ArgumentError):
            validate_args(parser.parse_args(argv), world_size=1)
    validate_args(parser.parse_args(["--use-distributed-optimizer", *OVERLAP]), world_size=1)
    validate_args(parser.parse_args(["--use-distributed-optimizer", *OVERLAP, "--save", "/tmp/x", "--load",
                                     "/tmp/x"]), world_size=1)


def test_planner_exposes_what_the_trainer_does_not_hide() -> None:
    from megatron_video.planning.cost import NO_OVERLAP, DataParallelOverlap

    both = DataParallelOverlap(True, True)
    assert NO_OVERLAP.buckets(1e9, 64) == 1 and NO_OVERLAP.exposed(4.0, 2.0, 100.0, 100.0, 1) == 6.0
    assert both.buckets(80e6, 8) == 2 and both.buckets(200e6, 100) == 2  # max(40M, 1M x DP) per bucket
    assert DataParallelOverlap(True, True, 10).buckets(100, 4) == 10
    # enough compute: only the last reduce-scatter bucket and the first all-gather bucket stay exposed
    assert both.exposed(4.0, 2.0, 100.0, 100.0, 10) == pytest.approx(0.6)
    # too little compute to hide behind: the excess stays exposed
    assert both.exposed(4.0, 2.0, 1.0, 0.5, 10) == pytest.approx(3.0 + 1.5)
    # gather overlap off: its whole time is exposed
    assert DataParallelOverlap(True, False).exposed(4.0, 2.0, 100.0, 100.0, 10) == pytest.approx(2.4)



def ema_evaluation_worker() -> list[dict]:
    """Three DP2 steps with an evaluation forward on the EMA weights after the first, overlap off and on."""
    from megatron.core import parallel_state as mpu

    from megatron_video.diffusion import build_objective
    from megatron_video.evaluation.runner import evaluation_weights
    from megatron_video.models.suv_mmdit.config import suv_config
    from megatron_video.parallel import initialize_parallel, set_seed
    from megatron_video.parallel.pipeline import run_forward_backward
    from megatron_video.training.loop import make_forward_step, t2v_inputs

    cfg, objective = suv_config("tiny"), build_objective("rectified_flow")
    out = []
    for overlap in (False, True):
        initialize_parallel()
        set_seed(0)
        parts = _components(cfg, 2, overlap, 3, "--ema-decay", "0.5")
        dp_rank = mpu.get_data_parallel_rank()
        record = {"losses": [], "eval": None, "buckets": len(parts.model.bucket_groups)}
        for step in range(3):
            record["losses"] += _forward_backward(parts, objective, _batch(cfg, dp_rank, step), step)
            parts.optimizer.step()
            parts.ema.update()
            if step == 0:  # what Evaluator.run and TrainingSampler.run do around their forwards
                with evaluation_weights(parts, use_ema=True), torch.no_grad():
                    losses = run_forward_backward(make_forward_step(objective, t2v_inputs, 0, 99),
                                                  iter([_batch(cfg, dp_rank, 99)]), parts.model, 1, 2,
                                                  forward_only=True)
                record["eval"] = losses[0]["loss"].item()
        parts.sync_params()
        record["weights"] = {n: p.detach().clone() for n, p in parts.module.named_parameters()}
        out.append(record)
    return out


@pytest.mark.slow
def test_evaluation_on_ema_weights_keeps_the_next_steps_exact():
    """With --overlap-param-gather a step leaves the model holding only this rank's shard of the new weights; an
    evaluation on the EMA weights between two steps must neither compute with stale weights nor leave them behind
    for the next training forward (it did: the EMA swap saved and restored the stale copy, and megatron, having
    gathered during the evaluation, did not gather again)."""
    for off, on in run_distributed(ema_evaluation_worker, 2, timeout=600):
        assert off["buckets"] == 1 and on["buckets"] > 3
        assert on["eval"] == pytest.approx(off["eval"], rel=1e-6, abs=0)
        _assert_same_training(off, on)


def controller_worker() -> list[dict]:
    """Four DP2 steps of a structure controller on a frozen (random) base, overlap off and on."""
    from megatron.core import parallel_state as mpu

    from megatron_video.control.training import control_inputs
    from megatron_video.diffusion import build_objective
    from megatron_video.models.control import ControlConfig, ControlledSUV
    from megatron_video.models.suv_mmdit.config import suv_config
    from megatron_video.parallel import initialize_parallel, set_seed
    from megatron_video.training.components import ModelWrap

    cfg, objective = suv_config("tiny"), build_objective("rectified_flow")
    control = ControlConfig(signal_channels=1, temporal_downsample=2, spatial_downsample=2, conv_channels=8,
                            num_blocks=2)

    def wrap(args, denoiser):
        return ModelWrap(ControlledSUV(denoiser, control), frozen_prefix="base.")

    out = []
    for overlap in (False, True):
        initialize_parallel()
        set_seed(0)
        parts = _components(cfg, 2, overlap, 4, "--ema-decay", "0", wrap=wrap)
        dp_rank = mpu.get_data_parallel_rank()
        record = {"losses": [], "buckets": len(parts.model.bucket_groups)}
        for step in range(4):
            batch = _batch(cfg, dp_rank, step)
            g = torch.Generator().manual_seed(7 * step + dp_rank)
            batch["structure"] = torch.randn(2, 1, *control.pixel_shape(tuple(batch["x0"].shape[2:])), generator=g)
            record["losses"] += _forward_backward(parts, objective, batch, step, control_inputs)
            parts.optimizer.step()
        parts.sync_params()
        record["weights"] = {n: p.detach().clone() for n, p in parts.module.controller.named_parameters()}
        out.append(record)
    return out


@pytest.mark.slow
def test_controller_training_with_overlap_equals_without():
    """The structure controller's forward reads every weight through its own module, so the gathered weights are
    the ones it computes with (it read its first convolution's and, at TP = 1, its projectors' directly before
    2026-12-05: tests/test_param_reads.py)."""
    for off, on in run_distributed(controller_worker, 2, timeout=600):
        assert off["buckets"] == 1 and on["buckets"] > 3
        _assert_same_training(off, on)


def gather_modes_worker() -> dict:
    """Two DP2 overlap steps with megatron's parameter all-gathers recorded: how each was issued."""
    import contextlib

    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import param_and_grad_buffer as buffers

    from megatron_video.diffusion import build_objective
    from megatron_video.models.suv_mmdit.config import suv_config
    from megatron_video.parallel import initialize_parallel, set_seed

    issued: list[tuple[bool, bool]] = []  # (inside an async coalescing block, async_op)
    inside_async = [False]
    manager, gather = buffers._coalescing_manager, buffers.dist_all_gather_func

    @contextlib.contextmanager
    def recording_manager(*args, async_ops: bool = False, **kwargs):
        inside_async[0] = async_ops
        try:
            with manager(*args, async_ops=async_ops, **kwargs) as cm:
                yield cm
        finally:
            inside_async[0] = False

    def recording_gather(*args, async_op: bool = False, **kwargs):
        issued.append((inside_async[0], async_op))
        return gather(*args, async_op=async_op, **kwargs)

    buffers._coalescing_manager, buffers.dist_all_gather_func = recording_manager, recording_gather
    cfg, objective = suv_config("tiny"), build_objective("rectified_flow")
    initialize_parallel()
    set_seed(0)
    parts = _components(cfg, 2, True, 2)
    for step in range(2):
        _forward_backward(parts, objective, _batch(cfg, mpu.get_data_parallel_rank(), step), step)
        parts.optimizer.step()
    return {"issued": issued, "buckets": len(parts.model.bucket_groups)}


@pytest.mark.slow
def test_cpu_parameter_gathers_are_never_asynchronous_coalesced():
    """gloo's asynchronous coalesced all-gather corrupts the heap (bench/stress_gloo_allgather.py); on CPU the
    adaptor makes megatron issue every parameter all-gather synchronously, still one per bucket group when its
    first pre-hook (or a forced sync) asks for it."""
    for record in run_distributed(gather_modes_worker, 2, timeout=600):
        assert record["buckets"] > 3
        assert record["issued"], "no parameter all-gather was recorded"
        assert not any(inside or op for inside, op in record["issued"]), record["issued"][:5]
        # the second step's forward gathers every bucket group again, once
        assert len(record["issued"]) >= 2 * record["buckets"]
