"""The structure controller (models/control) on a frozen SUV: zero-initialised it is the base model exactly;
training moves only the controller; its forward and gradients under TP2 + Megatron-SP, CP2 (both strategies)
and PP2 equal one rank."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

LATENT = (3, 6, 4)  # 18 tokens: skiparse (k = 2, 4) and CP pad, text 7 pads under SP


def _control_cfg(width: int | None = None):
    from megatron_video.models.control import ControlConfig

    return ControlConfig(signal_channels=1, temporal_downsample=2, spatial_downsample=2, conv_channels=8,
                         num_blocks=2, hidden_size=width)


def _batch(cfg, seed: int = 1) -> dict[str, torch.Tensor]:
    from tests.cp_fixtures import make_inputs

    batch = make_inputs(cfg, LATENT, seed)
    g = torch.Generator().manual_seed(seed + 100)
    batch["structure"] = torch.randn(2, 1, *_control_cfg().pixel_shape(LATENT), generator=g)
    return batch


def _controlled(cfg, config, stage=None, width: int | None = None):
    from megatron_video.models.control import ControlledSUV
    from megatron_video.models.suv_mmdit import SUVMMDiT

    return ControlledSUV(SUVMMDiT(cfg, config, stage, init_seed=5), _control_cfg(width))


@pytest.fixture(scope="module")
def small(tp1):
    from megatron_video.models.suv_mmdit import megatron_config, suv_config

    cfg = suv_config("small")
    return cfg, megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True)


@pytest.mark.parametrize("width", [None, 32])
def test_zero_initialised_controller_is_the_base_model(small, width):
    cfg, config = small
    model = _controlled(cfg, config, width=width)
    batch = _batch(cfg)
    target, structure = batch.pop("target"), batch.pop("structure")
    base_out = model.base(**batch)
    out = model(**batch, structure=structure)
    assert torch.equal(out, base_out)
    assert all(not p.requires_grad for p in model.base.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("controller.") for n in trainable)
    assert {f"controller.projector.linears.{j}.weight" for j in range(cfg.num_blocks)} <= trainable
    ((out - target) ** 2).mean().backward()  # gradients reach the projectors at step 0 (not the encoder: P = 0)
    assert model.controller.projector.linears["3"].weight.grad.abs().max() > 0


@pytest.mark.parametrize("width", [None, 32])
def test_training_moves_only_the_controller(small, width):
    cfg, config = small
    model = _controlled(cfg, config, width=width)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items() if v is not None}
    ctrl_before = {k: v.clone() for k, v in model.controller.state_dict().items() if v is not None}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(cfg)
    target, structure = batch.pop("target"), batch.pop("structure")
    for _ in range(3):
        optimizer.zero_grad()
        ((model(**batch, structure=structure) - target) ** 2).mean().backward()
        optimizer.step()
    for key, value in base_before.items():
        assert torch.equal(model.base.state_dict()[key], value), key
    changed = {k for k, v in ctrl_before.items() if not torch.equal(model.controller.state_dict()[k], v)}
    assert "encoder.conv_in.weight" in changed and "encoder.blocks.0.qkv.weight" in changed  # E learns
    assert "projector.linears.0.weight" in changed
    if width is not None:  # the narrower encoder: its own width throughout
        assert tuple(model.controller.encoder.blocks[0].qkv.weight.shape) == (3 * width, width)
        assert tuple(model.controller.projector.linears["0"].weight.shape) == (cfg.hidden_size, width)
    with torch.no_grad():
        assert not torch.equal(model(**batch, structure=structure), model.base(**batch))


def test_bad_structure_shape_is_a_clear_error(small):
    cfg, config = small
    model = _controlled(cfg, config)
    batch = _batch(cfg)
    del batch["target"]
    batch["structure"] = batch["structure"][:, :, :-1]
    with pytest.raises(ValueError, match="structure signal must be"):
        model(**batch)


def test_sampling_with_a_structure_signal(small):
    """Through the sampler, with guidance: zero-initialised, the controlled model samples what the base samples
    (bitwise); with non-zero projectors the structure signal changes the sample."""
    from megatron_video.sampling import SamplerConfig, TextBatch, sample

    cfg, config = small
    model = _controlled(cfg, config)
    batch = _batch(cfg)
    g = torch.Generator().manual_seed(3)
    text = TextBatch(torch.randn(2, 7, cfg.caption_channels, generator=g), torch.ones(2, 7, dtype=torch.bool),
                     torch.randn(2, cfg.pooled_projection_dim, generator=g))
    negative = TextBatch(torch.zeros(1, 7, cfg.caption_channels), torch.ones(1, 7, dtype=torch.bool),
                         torch.zeros(1, cfg.pooled_projection_dim))
    sampler = SamplerConfig(num_steps=2, guidance_scale=3.0)
    noise = batch["hidden_states"]

    def run(module, **structure):
        return sample(module, module, noise, text, sampler, negative=negative, **structure)

    base = run(model.base)
    assert torch.equal(run(model, structure=batch["structure"]), base)
    with torch.no_grad():
        for linear in model.controller.projector.linears.values():
            linear.weight.normal_(0.0, 0.05)
    assert not torch.allclose(run(model, structure=batch["structure"]), base)


def test_compiled_blocks_run_in_the_encoder_too(small):
    """A base built with compiled elementwise regions (--compile) hands them to the encoder's blocks; with the
    "aot_eager" backend (captured graphs run by eager kernels, as tests/test_suv_elementwise.py) the controlled
    model's loss and controller gradients equal eager to 1e-6 relative (a decomposed graph may sum in another
    order)."""
    import torch._dynamo

    from megatron_video.models.control import ControlledSUV
    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.elementwise import EAGER

    cfg, config = small
    torch._dynamo.reset()
    batch = _batch(cfg)
    target, structure = batch.pop("target"), batch.pop("structure")
    results = []
    for backend in (None, "aot_eager"):
        model = ControlledSUV(SUVMMDiT(cfg, config, init_seed=5, compile_backend=backend), _control_cfg(32))
        with torch.no_grad():
            for linear in model.controller.projector.linears.values():  # let gradients reach the encoder
                linear.weight.copy_(torch.linspace(-0.05, 0.05, linear.weight.numel()).view_as(linear.weight))
        assert (model.base.block_ops is EAGER) == (backend is None)
        assert all(block.ops is model.base.block_ops for block in model.controller.encoder.blocks)
        loss = ((model(**batch, structure=structure) - target) ** 2).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.controller.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    assert grads["encoder.blocks.0.qkv.weight"].abs().max() > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def _space_to_depth(video: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """The folding written out: frame 0 padded in front by ft - 1 copies of itself, then (c, ft, fs, fs) blocks
    moved into channels."""
    b, c, t, h, w = video.shape
    video = torch.cat([video[:, :, :1].expand(b, c, ft - 1, h, w), video], dim=2)
    x = video.reshape(b, c, (t + ft - 1) // ft, ft, h // fs, fs, w // fs, fs)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * ft * fs * fs, (t + ft - 1) // ft, h // fs, w // fs)


def test_folding_to_the_latent_grid_is_a_space_to_depth_then_a_pointwise_convolution():
    """As the causal video VAE: pixel frames 1 + 2m -> latent frames 1 + m, frame 0 alone in latent frame 0. The
    strided form the encoder runs equals the 1x1x1 convolution of the folded video, in value and gradients."""
    from megatron_video.models.control.controller import fold_to_latent_grid

    torch.manual_seed(0)
    video = torch.randn(2, 3, 5, 4, 6, dtype=torch.float64)
    folded = _space_to_depth(video, 2, 2)
    assert folded.shape == (2, 24, 3, 2, 3)
    assert sorted(folded[0, :8, 2].flatten().tolist()) == sorted(video[0, 0, 3:5].flatten().tolist())
    conv = torch.nn.Conv3d(24, 5, 1, dtype=torch.float64)
    out = fold_to_latent_grid(video, conv, 2, 2)
    torch.testing.assert_close(out, conv(folded), rtol=1e-12, atol=1e-12)
    changed = video.clone()
    changed[:, :, 1:] += 1.0
    assert torch.equal(fold_to_latent_grid(changed, conv, 2, 2)[:, :, 0], out[:, :, 0])
    assert not torch.allclose(fold_to_latent_grid(changed, conv, 2, 2)[:, :, 1:], out[:, :, 1:])
    upstream = torch.randn_like(out)
    strided = torch.autograd.grad((out * upstream).sum(), [conv.weight, conv.bias])
    reference = torch.autograd.grad((conv(folded) * upstream).sum(), [conv.weight, conv.bias])
    for got, want in zip(strided, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    image = video[:, :, :1]  # one frame: one latent frame, as the VAE encodes an image
    torch.testing.assert_close(fold_to_latent_grid(image, conv, 2, 2), conv(_space_to_depth(image, 2, 2)),
                               rtol=1e-12, atol=1e-12)


def test_images_train_through_the_controller(small):
    """A batch of images (one latent frame; their structure signal one pixel frame) trains the controller: image
    and video buckets share a training run."""
    from tests.cp_fixtures import make_inputs

    cfg, config = small
    model = _controlled(cfg, config)
    batch = make_inputs(cfg, (1, 6, 4), 1)
    target = batch.pop("target")
    structure = torch.rand(2, 1, *_control_cfg().pixel_shape((1, 6, 4)), generator=torch.Generator().manual_seed(2))
    assert structure.shape[2] == 1
    for linear in model.controller.projector.linears.values():  # non-zero, so that the encoder gets gradients
        torch.nn.init.normal_(linear.weight, 0.0, 0.05)
    ((model(**batch, structure=structure) - target) ** 2).mean().backward()
    assert model.controller.encoder.conv_in.weight.grad.abs().max() > 0


# ------------------------------------------------------------------------------------------- multi-rank

# (tp, cp, pp, sequence_parallel, CP strategy, controller width); the one-rank variant of each width is its
# reference. The narrower encoder (32 of the base's 64) runs at TP2 + SP (its heads split), CP2 and PP2 (R
# zero-padded in the carry).
VARIANTS = [(1, 1, 1, False, None, None), (2, 1, 1, True, None, None), (1, 2, 1, False, "skiparse", None),
            (1, 2, 1, False, "ulysses", None), (1, 1, 2, False, None, None),
            (1, 1, 1, False, None, 32), (2, 1, 1, True, None, 32), (1, 2, 1, False, "skiparse", 32),
            (1, 1, 2, False, None, 32)]


def _random_controller_state(cfg, config, width: int | None) -> dict[str, torch.Tensor]:
    """A TP = 1 controller with non-zero projectors (at zero the encoder would get no gradient to compare)."""
    from megatron_video.models.control import StructureController
    from megatron_video.models.suv_mmdit import SUVMMDiT

    torch.manual_seed(7)
    state = StructureController(_control_cfg(width), SUVMMDiT(cfg, config, init_seed=5)).state_dict()
    state = {k: v for k, v in state.items() if v is not None}  # (megatron's empty _extra_state entries)
    g = torch.Generator().manual_seed(8)
    for key, value in state.items():
        if key.startswith("projector."):
            state[key] = 0.05 * torch.randn(value.shape, generator=g)
    return state


def _tp_shard(module: torch.nn.Module, full: dict[str, torch.Tensor], tp: int, rank: int) -> dict[str, torch.Tensor]:
    """This TP rank's part of the full-size `full` for `module`'s parameters (megatron tags the split dim)."""
    params = dict(module.named_parameters())
    out = {}
    for key, value in full.items():
        param = params.get(key)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            value = value.chunk(tp, dim=param.partition_dim)[rank]
        out[key] = value
    return out


def control_worker(cfg, variants) -> list[dict]:
    """Every rank: per variant build the controlled model (base weights: the released-name TP shards of one
    draw; controller: shards of one TP = 1 draw), run one forward-backward of a probe loss through megatron's
    schedule and DDP, and report the output (last stage) and the controller's full-size gradients."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_video.models.suv_mmdit import SUVMMDiT, megatron_config
    from megatron_video.models.suv_mmdit.context_parallel import set_context_parallel_strategy
    from megatron_video.models.suv_mmdit.pipeline import stage_of
    from megatron_video.models.suv_mmdit.state_dict_adapter import from_released, shard_released
    from megatron_video.parallel import initialize_parallel
    from megatron_video.parallel.pipeline import run_forward_backward
    from tests.test_suv_tp import random_released_weights

    initialize_parallel()
    ref_config = megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True)
    weights = random_released_weights(SUVMMDiT(cfg, ref_config))
    controller_states = {w: _random_controller_state(cfg, ref_config, w) for w in {v[-1] for v in variants}}
    batch = _batch(cfg)
    probe = torch.linspace(-1.0, 1.0, batch.pop("target").numel()).reshape(2, cfg.out_channels, *LATENT)
    results = []
    for tp, cp, pp, sp, strategy, width in variants:
        initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp)
        config = megatron_config(cfg, tensor_model_parallel_size=tp, context_parallel_size=cp,
                                 pipeline_model_parallel_size=pp, sequence_parallel=sp, params_dtype=torch.float32,
                                 pipeline_dtype=torch.float32, use_cpu_initialization=True)
        tp_rank, pp_rank = mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank()
        model = _controlled(cfg, config, stage_of(cfg, pp, pp_rank), width)
        controller_state = controller_states[width]
        if strategy == "ulysses":
            set_context_parallel_strategy(model.base, strategy)
        ours = from_released(shard_released(weights, tp, tp_rank), cfg)
        model.base.load_state_dict({k: v for k, v in ours.items() if k in model.base.state_dict()})
        own = model.controller.state_dict()
        missing, _ = model.controller.load_state_dict(
            _tp_shard(model.controller, {k: v for k, v in controller_state.items() if k in own}, tp, tp_rank),
            strict=False)
        assert all(key.endswith("_extra_state") for key in missing), missing
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        config.finalize_model_grads_func = finalize_model_grads
        store: dict[str, torch.Tensor] = {}

        def forward_step(iterator, module, store=store):
            out = module(**next(iterator))
            if mpu.is_pipeline_last_stage():
                store["output"] = out.detach().clone()

            def loss_func(prediction):
                loss = (prediction * probe).sum()
                return loss, {"loss": loss.detach().clone()}

            return out, loss_func

        recv, send = model.pipeline_shapes(2, LATENT, batch["encoder_hidden_states"].shape[2])
        run_forward_backward(forward_step, iter([batch]), ddp, 1, 2, recv, send)
        grads = {}
        for name, param in model.controller.named_parameters():
            grad = param.main_grad.clone()
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                parts = [torch.empty_like(grad) for _ in range(tp)]
                dist.all_gather(parts, grad, group=mpu.get_tensor_model_parallel_group())
                grad = torch.cat(parts, dim=param.partition_dim)
            grads[name] = grad
        results.append({"output": store.get("output"), "grads": grads, "rank": dist.get_rank()})
    return results


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """fp32 with reordered reductions (TP partial sums, CP text-copy sums, SP reduce-scatter): agreement to
    1e-5 of the tensor's scale, as the base model's TP / CP equivalence tests."""
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= 1e-5 * scale + 1e-7, f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.slow
def test_controller_under_tp_sp_cp_and_pp_matches_one_rank():
    from megatron_video.models.suv_mmdit import suv_config

    cfg = suv_config("small")
    per_rank = run_distributed(control_worker, 2, cfg, VARIANTS, timeout=600)
    references = {v[-1]: per_rank[0][i] for i, v in enumerate(VARIANTS) if v[:3] == (1, 1, 1)}
    for reference in references.values():
        assert reference["grads"]["encoder.conv_in.weight"].abs().max() > 0
        assert reference["grads"]["encoder.blocks.0.qkv.weight"].abs().max() > 0
        assert reference["output"].abs().max() > 0.1
    assert references[32]["grads"]["encoder.blocks.0.qkv.weight"].shape == (3 * 32, 32)  # the narrower encoder
    for i, variant in enumerate(VARIANTS):
        if variant[:3] == (1, 1, 1):
            continue
        reference = references[variant[-1]]
        ranks = [r[i] for r in per_rank]
        outputs = [r["output"] for r in ranks if r["output"] is not None]
        assert outputs, variant
        for out in outputs:
            _close(out, reference["output"], f"output at {variant}")
        grads = {}
        for r in ranks:  # PP: each stage reports its own parameters; otherwise every rank all of them
            grads.update(r["grads"])
        assert grads.keys() == reference["grads"].keys(), variant
        for key, grad in reference["grads"].items():
            _close(grads[key], grad, f"grad of {key} at {variant}")
