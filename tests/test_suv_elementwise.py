"""The SUV block's elementwise regions in the compute dtype, and their compiled form (`--compile`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
from megatron_video.models.suv_mmdit.config import megatron_config
from megatron_video.models.suv_mmdit.elementwise import gelu_tanh, norm_modulate, rms_norm_rope
from megatron_video.models.suv_mmdit.state_dict_adapter import load_released
from tests.test_suv_tp import _inputs, random_released_weights


def build(dtype: torch.dtype, compile_backend: str | None = None, weights: dict | None = None) -> SUVMMDiT:
    cfg = suv_config("tiny")
    model = SUVMMDiT(cfg, megatron_config(cfg, params_dtype=dtype, use_cpu_initialization=True),
                     compile_backend=compile_backend)
    weights = weights if weights is not None else random_released_weights(model, seed=0)
    load_released(model, {k: v.to(dtype) for k, v in weights.items()}, 1, 0)
    return model


def loss_and_grads(model: SUVMMDiT, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    dtype = model.config.params_dtype
    cast = {k: v.to(dtype) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
            for k, v in inputs.items()}
    out = model(**cast)
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_norms_and_gelu_in_bf16_equal_the_fp32_upcast() -> None:
    """torch's LayerNorm, RMSNorm and GELU kernels take bf16 in, accumulate in fp32 and round once: bitwise what
    upcasting, computing in fp32 and rounding gives (CPU kernels; the CUDA ones use the same fp32 opmath), but
    without the fp32 copies of the activations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, 32, generator=g).bfloat16()
    w, b = (1 + 0.2 * torch.randn(32, generator=g)).bfloat16(), (0.2 * torch.randn(32, generator=g)).bfloat16()
    zero, one = torch.zeros(2, 32), torch.zeros(2, 32)  # modulation that leaves the norm as it is
    ln = norm_modulate(x, w, b, 1e-6, zero, one)
    assert torch.equal(ln, F.layer_norm(x.float(), (32,), w.float(), b.float(), 1e-6).bfloat16())
    u = torch.randn(40, 2, 3, 16, generator=g).bfloat16()
    rms = rms_norm_rope(u, w[:16], 1e-6, None, None)
    uf = u.float()
    assert torch.equal(rms, (uf * torch.rsqrt(uf.pow(2).mean(-1, keepdim=True) + 1e-6) * w[:16].float()).bfloat16())
    assert torch.equal(gelu_tanh(x), F.gelu(x.float(), approximate="tanh").bfloat16())


def test_bf16_model_close_to_fp32(tp1) -> None:
    """The whole tiny model (6 blocks, skiparse k = 2, random weights of std 0.3) in bf16 against fp32 with the same
    weights: relative L2 error of the output <= 0.1. Measured 0.082 with the elementwise work in bf16, 0.080 with
    every region upcast to fp32 as at commit 2375d38 (the same weights and inputs): the error is bf16's own
    (weights, matmuls, the stream) and the regions add about 2 % to it."""
    weights = random_released_weights(build(torch.float32), seed=0)
    inputs = _inputs(suv_config("tiny"))
    with torch.no_grad():
        ref = build(torch.float32, weights=weights)(**inputs)
        low = build(torch.bfloat16, weights=weights)(**{k: v.bfloat16() if v.is_floating_point() else v
                                                        for k, v in inputs.items()})
    assert low.dtype == torch.bfloat16
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert rel <= 0.1, rel


def test_compiled_elementwise_regions_match_eager(tp1) -> None:
    """torch.compile with the "aot_eager" backend: dynamo captures each region and AOTAutograd traces its forward
    and backward graphs (what inductor then turns into fused kernels), run by eager kernels, so this checks the
    capture, the autograd of the compiled regions and their wiring into the blocks without a C++ toolchain's
    compile time. fp32: loss and every gradient equal eager to 1e-6 relative (the decomposed graphs may
    associate a sum differently)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    inputs = _inputs(suv_config("tiny"))
    weights = random_released_weights(build(torch.float32), seed=0)
    eager_loss, eager_grads = loss_and_grads(build(torch.float32, weights=weights), inputs)
    compiled = build(torch.float32, "aot_eager", weights)
    assert compiled.blocks[0].ops.gelu is not gelu_tanh  # the compiled wrappers are in use
    loss, grads = loss_and_grads(compiled, inputs)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] >= 4  # whole regions captured
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-6, atol=1e-7, msg=name)
