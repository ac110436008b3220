"""Sharded fp32 EMA of the weights: a hand-computed EMA over a few steps with DP = 2 sharding."""

from __future__ import annotations

import io

import pytest
import torch

from tests.harness import run_distributed


def test_decay_validated():
    from megatron_video.optim import ShardedEMA

    with pytest.raises(ValueError, match="decay"):
        ShardedEMA(object(), [], decay=1.0)


def _ema_run(decay: float) -> dict:
    from megatron_video.optim import OptimizerOptions, ShardedEMA, build_optimizer
    from megatron_video.parallel import initialize_parallel
    from tests.test_optim_helpers import (
        HIDDEN,
        SEQ,
        backward,
        build_model,
        full_params,
        full_weights,
        local_batch,
    )

    initialize_parallel()  # 2 ranks: DP = 2
    weights = full_weights(3)
    model = build_model(1, weights)
    options = OptimizerOptions(lr=5e-2, weight_decay=0.0, adam_eps=1e-8, precision="fp32", clip_mode="none")
    opt = build_optimizer([model], options)
    ema = ShardedEMA(opt, [model], decay=decay)
    total = sum(w.numel() for w in weights.values())
    hand = {k: v.clone() for k, v in weights.items()}
    gen = torch.Generator().manual_seed(0)
    stepped = []
    for kind in ["normal", "normal", "nan", "normal"]:
        x = torch.randn(SEQ, 4, HIDDEN, generator=gen)
        target = torch.randn(SEQ, 4, HIDDEN, generator=gen)
        if kind == "nan":
            target[:] = float("nan")
        model.zero_grad_buffer()
        opt.zero_grad()
        backward(model, local_batch(x, 2, _dp_rank()), local_batch(target, 2, _dp_rank()), 1.0)
        record = opt.step()
        stepped.append(record.stepped)
        if record.stepped:  # the training-loop rule: no EMA update on a skipped step
            ema.update()
            current = full_params(model, 1)
            hand = {k: decay * hand[k] + (1 - decay) * current[k] for k in hand}
    full = ema.full_state_dict()
    err = max((full[k] - hand[k]).abs().max().item() for k in hand)

    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    again = ShardedEMA(opt, [model], decay=decay)
    again.load_state_dict(torch.load(buf, weights_only=True))
    from_full = ShardedEMA(opt, [model], decay=decay)
    from_full.load_full_state_dict(full)
    bad = ema.state_dict()
    name = next(iter(bad["shards"]))
    bad["shards"][name] = {**bad["shards"][name], "start": bad["shards"][name]["start"] + 1}
    try:
        again.load_state_dict(bad)
        layout_error = ""
    except ValueError as exc:
        layout_error = str(exc)
    return {
        "err": err,
        "stepped": stepped,
        "num_updates": ema.num_updates,
        "local_numel": ema.local_numel(),
        "total": total,
        "names": sorted(full),
        "dtypes": sorted({str(t.dtype) for t in full.values()}),
        "moved": max((full[k] - weights[k]).abs().max().item() for k in weights),
        "round_trip": _equal(again.full_state_dict(), full),
        "from_full": _equal(from_full.full_state_dict(), full),
        "layout_error": layout_error,
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dp_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_rank()


@pytest.mark.slow
def test_sharded_ema_matches_hand_computed_dp2():
    results = run_distributed(_ema_run, 2, 0.8)
    for res in results:
        assert res["stepped"] == [True, True, False, True]
        assert res["num_updates"] == 3
        assert res["err"] < 1e-6
        assert res["moved"] > 1e-3  # the EMA really moved away from the initial weights
        assert res["names"] == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "scale"]
        assert res["dtypes"] == ["torch.float32"]
        assert res["round_trip"] and res["from_full"]
        assert "this rank owns" in res["layout_error"]
        assert 0 < res["local_numel"] < res["total"]  # each DP rank holds only its shard
    assert sum(r["local_numel"] for r in results) == results[0]["total"]  # the shards tile the model


def _ema_bf16_run() -> dict:
    from megatron_video.optim import OptimizerOptions, ShardedEMA, build_optimizer
    from megatron_video.parallel import initialize_parallel
    from tests.test_optim_helpers import (
        HIDDEN,
        SEQ,
        backward,
        build_model,
        full_params,
        full_weights,
        local_batch,
    )

    initialize_parallel()
    model = build_model(1, full_weights(4), dtype=torch.bfloat16)
    options = OptimizerOptions(lr=1e-3, adam_eps=1e-8, precision="bf16", clip_mode="none")
    opt = build_optimizer([model], options)
    ema = ShardedEMA(opt, [model], decay=0.0)  # decay 0: the EMA is the fp32 main weights themselves
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SEQ, 4, HIDDEN, generator=gen).bfloat16()
    target = torch.randn(SEQ, 4, HIDDEN, generator=gen).bfloat16()
    model.zero_grad_buffer()
    opt.zero_grad()
    backward(model, local_batch(x, 2, _dp_rank()), local_batch(target, 2, _dp_rank()), 1.0)
    assert opt.step().stepped
    ema.update()
    full = ema.full_state_dict()
    params = full_params(model, 1)  # bf16 model weights (as fp32)
    return {
        "dtypes": sorted({str(t.dtype) for t in full.values()}),
        "rounds_to_model": all(torch.equal(full[k].bfloat16().float(), params[k]) for k in params),
        "finer_than_bf16": any(not torch.equal(full[k], params[k]) for k in params),
    }


@pytest.mark.slow
def test_sharded_ema_keeps_fp32_with_bf16_params():
    for res in run_distributed(_ema_bf16_run, 2):
        assert res["dtypes"] == ["torch.float32"]
        assert res["rounds_to_model"]  # the EMA of decay 0 is the fp32 master copy of the bf16 weights
        assert res["finer_than_bf16"]


def _ema_checkpoint_save(directory: str) -> dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing

    from megatron_video.optim import OptimizerOptions, ShardedEMA, build_optimizer
    from megatron_video.parallel import initialize_parallel
    from tests.test_optim_helpers import HIDDEN, SEQ, backward, build_model, full_weights, local_batch

    initialize_parallel(tensor_model_parallel_size=2)  # 4 ranks: TP = 2 x DP = 2
    model = build_model(2, full_weights(6))
    opt = build_optimizer([model], OptimizerOptions(lr=5e-2, precision="fp32", clip_mode="none"))
    ema = ShardedEMA(opt, [model], decay=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, target = torch.randn(SEQ, 4, HIDDEN, generator=gen), torch.randn(SEQ, 4, HIDDEN, generator=gen)
        model.zero_grad_buffer()
        opt.zero_grad()
        backward(model, local_batch(x, 2, _dp_rank()), local_batch(target, 2, _dp_rank()), 1.0)
        assert opt.step().stepped
        ema.update()
    dist_checkpointing.save({"ema": ema.sharded_state_dict(model.sharded_state_dict())}, directory)
    return _gather_tp(ema.full_state_dict(), 2)


def _ema_checkpoint_load(directory: str) -> dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing

    from megatron_video.optim import OptimizerOptions, ShardedEMA, build_optimizer
    from megatron_video.parallel import initialize_parallel
    from tests.test_optim_helpers import build_model, full_weights

    initialize_parallel()  # TP = 1 x DP = world size
    model = build_model(1, full_weights(7))
    opt = build_optimizer([model], OptimizerOptions(precision="fp32", clip_mode="none"))
    ema = ShardedEMA(opt, [model])
    loaded = dist_checkpointing.load({"ema": ema.sharded_state_dict(model.sharded_state_dict())}, directory)
    ema.load_sharded_state_dict(loaded.get("ema", {}))  # a rank holding no range gets no "ema" entry
    return ema.full_state_dict()


def _gather_tp(full: dict[str, torch.Tensor], tp: int) -> dict[str, torch.Tensor]:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    out = {}
    for name, tensor in full.items():
        if name in ("fc1.weight", "fc1.bias", "fc2.weight"):
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=mpu.get_tensor_model_parallel_group())
            tensor = torch.cat(parts, dim=1 if name == "fc2.weight" else 0)
        out[name] = tensor
    return out


@pytest.mark.slow
def test_ema_checkpoint_reshards_tp2_dp2_to_tp1_dp2(tmp_path):
    """Each rank saves only its own EMA range (rectangular pieces of the model-space tensor); loading at another
    TP and DP size gives every rank exactly the saved values of its new range (no arithmetic: bitwise)."""
    saved = run_distributed(_ema_checkpoint_save, 4, str(tmp_path))[0]
    for world in (2, 3):  # TP 2 -> 1 at DP 2, and at DP 3 (ranges no longer aligned with the saved ones)
        for loaded in run_distributed(_ema_checkpoint_load, world, str(tmp_path)):
            assert loaded.keys() == saved.keys()
            for name in saved:
                assert torch.equal(loaded[name], saved[name]), (world, name)
