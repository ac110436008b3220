"""Pipeline stages of the SUV model chained by hand in one process (what the schedule does across ranks):
each stage holds only its parts under global names, the long skips cross stages inside the carry tensor,
and the chain equals the whole model - bit-exactly forward in bf16 (temb crosses as fp32 bits)."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
from megatron_video.models.suv_mmdit.config import megatron_config
from megatron_video.models.suv_mmdit.pipeline import crossing_skips, pipeline_stages
from megatron_video.models.suv_mmdit.state_dict_adapter import from_released
from tests.test_suv_tp import _inputs, random_released_weights


@pytest.fixture(scope="module")
def single_rank():
    import torch.distributed as dist

    from megatron_video.parallel import init_distributed, initialize_parallel
    from megatron_video.parallel.spawn import free_port

    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())
        init_distributed("cpu")
    if dist.get_world_size() != 1:
        pytest.fail("these tests need a single-process group")
    initialize_parallel()


def _build(cfg, dtype, stage=None, recompute=None) -> SUVMMDiT:
    config = megatron_config(cfg, params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=True,
                             **(recompute or {}))
    return SUVMMDiT(cfg, config, stage)


def _load(model: SUVMMDiT, weights: dict, dtype) -> None:
    ours = from_released(weights, model.cfg)
    assert all(name in ours for name, _ in model.named_parameters())
    model.load_state_dict({k: v.to(dtype) for k, v in ours.items() if k in model.state_dict()}, strict=False)


def _chain(stages: list[SUVMMDiT], inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward through the stages like the schedule (received tensors are fresh leaves); returns the output
    and the received leaves, whose .grad the backward chain fills."""
    received, carry = [], None
    for model in stages:
        if carry is not None:
            leaf = carry.detach().requires_grad_()
            received.append((leaf, carry))
            model.set_input_tensor([leaf])
        carry = model(**inputs)
    return carry, received


def _backward_chain(out: torch.Tensor, probe: torch.Tensor, received) -> None:
    (out.float() * probe).sum().backward()
    for leaf, sent in reversed(received):  # send each input's gradient back to the stage that sent it
        sent.backward(leaf.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stage_chain_equals_whole_model(single_rank, dtype) -> None:
    cfg = suv_config("small")
    split = (4, 3, 3)  # blocks 0-3 | 4-6 | 7-9: skip 3 -> 6 crosses one boundary, 1 -> 8 crosses two
    assert crossing_skips(cfg, 3, split) == [(3, 6), (1, 8)]
    whole = _build(cfg, dtype)
    weights = random_released_weights(whole)
    _load(whole, weights, dtype)
    stages = [_build(cfg, dtype, s) for s in pipeline_stages(cfg, 3, split)]
    for model in stages:
        _load(model, weights, dtype)
    # each stage holds only its parts, under the global names
    names = [set(dict(m.named_parameters())) for m in stages]
    assert set().union(*names) == set(dict(whole.named_parameters()))
    assert sum(len(n) for n in names) == len(dict(whole.named_parameters()))
    assert any(n.startswith("patch_embed.") for n in names[0]) and not any(n.startswith("final.") for n in names[0])
    assert {n.split(".")[1] for n in names[1] if n.startswith("blocks.")} == {"4", "5", "6"}
    assert any(n.startswith("final.") for n in names[2]) and not any(n.startswith("patch_embed.") for n in names[2])
    assert [m.pipeline_shapes(2, (3, 6, 4), 7) for m in stages][1] == ((3 * 25 + 1, 2, 64), (2 * 25 + 1, 2, 64))

    inputs = _inputs(cfg)
    inputs = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    probe = torch.linspace(-1, 1, 2 * cfg.out_channels * 3 * 6 * 4).reshape(2, cfg.out_channels, 3, 6, 4)
    ref = whole(**inputs)
    (ref.float() * probe).sum().backward()
    out, received = _chain(stages, inputs)
    assert [tuple(leaf.shape) for leaf, _ in received] == [(3 * 25 + 1, 2, 64), (2 * 25 + 1, 2, 64)]
    assert torch.equal(out, ref)  # same ops in the same order; nothing rounded on the way
    _backward_chain(out, probe, received)
    ref_grads = dict(whole.named_parameters())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for model in stages:
        for name, p in model.named_parameters():
            if p.requires_grad:
                expected = ref_grads[name].grad.float()
                err = (p.grad.float() - expected).abs().max().item()
                assert err <= tol * expected.abs().max().item() + 1e-7, f"grad of {name}: {err}"
    skip = stages[1].blocks[6].long_skip.video.weight.grad  # consumes block 3's output from stage 0
    assert skip.abs().max() > 0


def test_stage_recompute_counts_blocks_per_stage(single_rank) -> None:
    cfg = suv_config("small")
    stage = pipeline_stages(cfg, 2)[1]
    model = _build(cfg, torch.float32, stage, {"recompute_granularity": "full", "recompute_method": "block",
                                               "recompute_num_layers": 2})
    assert model.recompute_blocks == {5, 6}  # the first two blocks of this stage, as Megatron counts


def test_later_stage_needs_its_input(single_rank) -> None:
    cfg = suv_config("small")
    model = _build(cfg, torch.float32, pipeline_stages(cfg, 2)[1])
    with pytest.raises(RuntimeError, match="set_input_tensor"):
        model(**_inputs(cfg))
    model.set_input_tensor([torch.zeros(5, 2, 64)])
    with pytest.raises(ValueError, match="expected"):
        model(**_inputs(cfg))


def test_checkpoint_keys_are_global_and_partitioned(single_rank) -> None:
    """Every parameter is saved by exactly one stage under the same key as at PP = 1, so a checkpoint saved at
    one pipeline size loads at another."""
    from megatron_video.training.checkpointing import model_sharded_state_dict

    cfg = suv_config("small")
    whole = set(model_sharded_state_dict(_build(cfg, torch.float32)))
    for pp, split in ((2, None), (4, None), (3, (2, 5, 3))):
        keys = [set(model_sharded_state_dict(_build(cfg, torch.float32, s))) for s in pipeline_stages(cfg, pp, split)]
        assert set().union(*keys) == whole
        assert sum(len(k) for k in keys) == len(whole), f"a key is saved by two stages at PP={pp}"
