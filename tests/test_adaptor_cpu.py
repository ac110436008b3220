"""megatron-core on CPU/gloo through the cpu adaptor: TP layers with sequence parallel, DDP + distributed
optimizer, the 1F1B pipeline schedule and dist_checkpointing, each checked against a one-rank computation.

Tolerances: fp32 throughout; collectives change the summation order only, so results agree to ~1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import RankFailure, run_distributed


def _model_parallel_config(tp: int, sequence_parallel: bool = False, pp: int = 1):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
    )


def test_prepare_is_idempotent_and_redirects():
    from megatron_video.adaptor import cpu, setup_device

    backend = setup_device("cpu")
    assert setup_device("cpu") is backend
    factory = torch.zeros
    cpu.prepare()
    assert torch.zeros is factory, "a second prepare() must not wrap the factories again"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"
    assert backend.dist_backend == "gloo"
    with pytest.raises(RuntimeError, match="cannot switch"):
        setup_device("cuda")


def test_device_context_still_sees_the_factories():
    from megatron_video.adaptor import setup_device

    setup_device("cpu")
    with torch.device("meta"):  # transformers builds models this way before loading weights
        made = [torch.tensor([1.0]), torch.full((2,), 3.0), torch.zeros(2), torch.arange(3), torch.empty(1)]
    assert [t.device.type for t in made] == ["meta"] * 5


def test_grad_norm_fallback_is_one_foreach_norm_with_the_same_value():
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    from megatron_video.adaptor import cpu, setup_device

    setup_device("cpu")
    assert clip_grads.l2_norm_impl is cpu._foreach_l2_norm
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) * scale
             for shape, scale in [((64, 33), 1e-3), ((7,), 10.0), ((3, 5, 2), 1.0), ((1,), 1e-6)]]
    ours, _ = cpu._foreach_l2_norm(2048, None, [grads], False)
    theirs, _ = mcore_utils.local_multi_tensor_l2_norm(2048, None, [grads], False)
    assert ours.shape == theirs.shape == (1,) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert float(ours) == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()), rel=1e-6)


def test_rng_tracker_fork_is_reproducible():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_video.adaptor import setup_device

    setup_device("cpu")
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-rng", 1234)
    torch.manual_seed(0)
    with tracker.fork("test-rng"):
        a = torch.rand(3)
    outside = torch.rand(3)
    tracker.reset()
    tracker.add("test-rng", 1234)
    torch.manual_seed(0)
    with tracker.fork("test-rng"):
        b = torch.rand(3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(0)
    torch.testing.assert_close(outside, torch.rand(3), rtol=0, atol=0)  # fork restores the outer state
    tracker.reset()


def _tp_column_row(sequence_parallel: bool):
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region,
        scatter_to_sequence_parallel_region,
    )

    from megatron_video.parallel import CommCounter, initialize_parallel, set_seed

    initialize_parallel(tensor_model_parallel_size=4)
    set_seed(7)
    tp, rank = 4, mpu.get_tensor_model_parallel_rank()
    config = _model_parallel_config(tp, sequence_parallel)
    init = torch.nn.init.normal_
    col = ColumnParallelLinear(8, 16, config=config, init_method=init, bias=True, gather_output=False)
    row = RowParallelLinear(16, 8, config=config, init_method=init, bias=True, input_is_parallel=True,
                            skip_bias_add=False)
    torch.manual_seed(0)
    full_w1, full_b1 = torch.randn(16, 8), torch.randn(16)
    full_w2, full_b2 = torch.randn(8, 16), torch.randn(8)
    with torch.no_grad():
        col.weight.copy_(full_w1.chunk(tp, 0)[rank])
        col.bias.copy_(full_b1.chunk(tp, 0)[rank])
        row.weight.copy_(full_w2.chunk(tp, 1)[rank])
        row.bias.copy_(full_b2)
    x = torch.randn(12, 2, 8, requires_grad=True)  # (seq, batch, hidden)
    local = scatter_to_sequence_parallel_region(x) if sequence_parallel else x
    with CommCounter() as counter:
        hidden, _ = col(local)
        out, _ = row(torch.nn.functional.gelu(hidden))
        if sequence_parallel:
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        out.sum().backward()
    reference = torch.nn.functional.gelu(x.detach() @ full_w1.T + full_b1) @ full_w2.T + full_b2
    ops = sorted(op for op, s in counter.stats.items() if s.calls)
    return (out.detach() - reference).abs().max().item(), col.weight.grad.shape, ops


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp_column_row_equals_unsplit_matmul(sequence_parallel):
    results = run_distributed(_tp_column_row, 4, sequence_parallel)
    for err, grad_shape, ops in results:
        assert err < 1e-5
        assert tuple(grad_shape) == (4, 8)
        if sequence_parallel:
            assert "all_gather_into_tensor" in ops or "_all_gather_base" in ops
            assert "reduce_scatter_tensor" in ops or "_reduce_scatter_base" in ops
        else:
            assert "all_reduce" in ops


def _ddp_distributed_optimizer(steps: int):
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from megatron_video.parallel import initialize_parallel, set_seed

    initialize_parallel(tensor_model_parallel_size=2)
    set_seed(3)
    tp, tp_rank, dp_rank = 2, mpu.get_tensor_model_parallel_rank(), mpu.get_data_parallel_rank()
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=tp,
                               use_cpu_initialization=True, params_dtype=torch.float32)

    class TwoLayer(MegatronModule):
        def __init__(self) -> None:
            super().__init__(config)
            init = torch.nn.init.normal_
            self.fc1 = ColumnParallelLinear(8, 16, config=config, init_method=init, bias=True, gather_output=False)
            self.fc2 = RowParallelLinear(16, 8, config=config, init_method=init, bias=True,
                                         input_is_parallel=True, skip_bias_add=False)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)[0]))[0]

    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    module = TwoLayer()
    with torch.no_grad():
        module.fc1.weight.copy_(w1.chunk(tp, 0)[tp_rank])
        module.fc1.bias.copy_(b1.chunk(tp, 0)[tp_rank])
        module.fc2.weight.copy_(w2.chunk(tp, 1)[tp_rank])
        module.fc2.bias.copy_(b2)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                               overlap_grad_reduce=False, bucket_size=None)
    model = DistributedDataParallel(config, ddp_config, module)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99,
                                 use_distributed_optimizer=True, clip_grad=0.0, bf16=False, fp16=False)
    optimizer = get_megatron_optimizer(opt_config, [model])
    batches = torch.randn(steps, 4, 3, 8)  # per step: 4 samples (2 per DP rank) x 3 tokens
    for step in range(steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        x = batches[step, 2 * dp_rank: 2 * dp_rank + 2].transpose(0, 1)  # (seq, batch, hidden)
        loss = model(x).pow(2).mean() / 2  # mean over the local half; DDP averages over the 2 DP ranks
        loss.backward()
        model.finish_grad_sync()
        optimizer.step()
    full_fc1 = [torch.empty_like(module.fc1.weight) for _ in range(tp)]
    torch.distributed.all_gather(full_fc1, module.fc1.weight.detach().contiguous(),
                                 group=mpu.get_tensor_model_parallel_group())
    return torch.cat(full_fc1, 0), module.fc2.bias.detach().clone(), (w1, b1, w2, b2, batches)


def _plain_adam_reference(w1, b1, w2, b2, batches):
    params = [p.clone().requires_grad_() for p in (w1, b1, w2, b2)]
    optimizer = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for batch in batches:
        optimizer.zero_grad()
        x = batch.transpose(0, 1)
        out = torch.tanh(x @ params[0].T + params[1]) @ params[2].T + params[3]
        (out.pow(2).mean() / 2).backward()
        optimizer.step()
    return params[0].detach(), params[3].detach()


@pytest.mark.slow
def test_ddp_distributed_optimizer_matches_plain_adam():
    results = run_distributed(_ddp_distributed_optimizer, 4, 3)
    w1, b1, w2, b2, batches = results[0][2]
    ref_fc1, ref_b2 = _plain_adam_reference(w1, b1, w2, b2, batches)
    assert not torch.equal(ref_fc1, w1), "the reference must actually move the weights"
    for fc1, bias2, _ in results:
        torch.testing.assert_close(fc1, ref_fc1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias2, ref_b2, rtol=1e-5, atol=1e-6)


def _pipeline_1f1b(num_microbatches: int):
    from megatron.core import parallel_state as mpu
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from megatron_video.parallel import CommCounter, initialize_parallel

    initialize_parallel(pipeline_model_parallel_size=4)
    stage = mpu.get_pipeline_model_parallel_rank()
    torch.manual_seed(0)
    weights = torch.randn(4, 6, 6) / 3
    data = torch.randn(num_microbatches, 5, 2, 6)  # (seq, batch, hidden) per micro-batch
    layer = torch.nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weights[stage])

    class Stage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer
            self.input_tensor = None

        def set_input_tensor(self, tensor):
            self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

        def forward(self, x):
            h = x if stage == 0 else self.input_tensor
            return torch.tanh(self.layer(h))

    model = Stage()
    # the schedules read the config (hidden size gives the p2p shape) and the model type from the model
    model.config = TransformerConfig(num_layers=4, hidden_size=6, num_attention_heads=2, pipeline_model_parallel_size=4,
                                     pipeline_dtype=torch.float32, use_cpu_initialization=True)
    model.model_type = ModelType.encoder_or_decoder
    batches = iter(list(data))

    def forward_step(iterator, module):
        x = next(iterator)
        out = module(x)

        def loss_func(output):
            loss = output.pow(2).mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

        return out, loss_func

    with CommCounter() as counter:
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[model],
            num_microbatches=num_microbatches, seq_length=5, micro_batch_size=2, forward_only=False,
        )
    return stage, [d["loss"] for d in losses], layer.weight.grad.clone(), weights, data, \
        counter.stats["p2p_send"].calls


@pytest.mark.slow
def test_1f1b_schedule_matches_sequential():
    results = run_distributed(_pipeline_1f1b, 4, 3)
    _, _, _, weights, data = results[0][:5]
    params = [w.clone().requires_grad_() for w in weights]
    losses = []
    for x in data:
        h = x
        for w in params:
            h = torch.tanh(h @ w.T)
        loss = h.pow(2).mean()
        (loss / len(data)).backward()
        losses.append(loss.detach())
    last = next(r for r in results if r[0] == 3)
    torch.testing.assert_close(torch.stack(last[1]), torch.stack(losses), rtol=1e-6, atol=1e-7)
    for stage, _, grad, _, _, sends in results:
        torch.testing.assert_close(grad, params[stage].grad, rtol=1e-5, atol=1e-7)
        assert sends > 0, "pipeline stages must exchange activations/gradients"


def _dist_checkpoint_roundtrip(directory: str):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_video.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2)
    tp, tp_rank = 2, mpu.get_tensor_model_parallel_rank()
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    local = full.chunk(tp, 0)[tp_rank].clone()
    state = {"weight": ShardedTensor.from_rank_offsets("weight", local, (0, tp_rank, tp), replica_id=dp_rank)}
    dist_checkpointing.save(state, directory)
    torch.distributed.barrier()
    # load into a different split: along dim 1 instead of dim 0
    target = torch.zeros(6, 2)
    load_state = {"weight": ShardedTensor.from_rank_offsets("weight", target, (1, tp_rank, tp),
                                                            replica_id=dp_rank)}
    loaded = dist_checkpointing.load(load_state, directory)
    return (loaded["weight"] - full.chunk(tp, 1)[tp_rank]).abs().max().item(), dp_size


@pytest.mark.slow
def test_dist_checkpointing_save_load_resharded(tmp_path):
    (tmp_path / "ckpt").mkdir()
    for err, dp_size in run_distributed(_dist_checkpoint_roundtrip, 4, str(tmp_path / "ckpt")):
        assert err == 0.0
        assert dp_size == 2


def _raises_on_rank(bad_rank: int):
    import torch.distributed as dist

    if dist.get_rank() == bad_rank:
        raise ValueError("boom on purpose")
    dist.barrier()


def test_harness_reports_failing_rank():
    with pytest.raises(RankFailure) as info:
        run_distributed(_raises_on_rank, 2, 1, timeout=60)
    assert info.value.rank == 1
    assert "boom on purpose" in str(info.value)
