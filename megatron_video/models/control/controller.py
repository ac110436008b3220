"""The structure condition controller of Open-Sora Plan (section 2.3.2) on a frozen SUV denoiser.

Reads like the paper: an encoder E turns the structure signal C_S (a pixel video: canny edges, depth or
sketch) into tokens shaped like the denoiser's video stream, R = E(C_S, t): a tiny 3D-convolution network
downsamples C_S to the latent grid, a patch convolution makes one token per latent patch (the base's token
order), and K shape-preserving transformer blocks refine them, modulated by the base's timestep embedding (the
paper writes R = E(C_S); without the timestep the quickstart's controller learned less: docs/DESIGN.md §15).
A projector of one token-wise linear map per base block gives F_j = P_j(R), and the controlled model runs
X_j = X_j + F_j after block j. Every P_j starts at zero, so at step 0 the controlled model is the base model.

Parallel layouts: R is computed whole and in natural token order on the first pipeline stage (replicated over
TP and CP; its blocks run without sequence parallelism), crosses pipeline stages in the carry beside the long
skips, and each P_j reads this rank's rows of R in the layout block j's output is in: R padded like X, the CP
rank's tokens of the block's layout picked with the model's own index maps, and P_j a row-parallel linear
whose reduce-scatter (Megatron-SP) leaves exactly this TP rank's sequence shard. Gradients: R's gradient is
partial per CP rank (each rank's tokens) and DDP sums the replicated controller's gradients over DP x CP, as
it does for the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    scatter_to_tensor_model_parallel_region,
)
from torch import Tensor, nn

from megatron_video.models.attention import attention
from megatron_video.models.suv_mmdit.config import SUVConfig
from megatron_video.models.suv_mmdit.elementwise import EAGER, BlockElementwise
from megatron_video.models.suv_mmdit.layers import (
    HeadRMSNorm,
    LayerNorm,
    Modulation,
    normal_init,
    without_sequence_parallel,
)
from megatron_video.models.suv_mmdit.model import SUVBlock, SUVMMDiT
from megatron_video.models.suv_mmdit.skiparse import pad_sequence


@dataclass(frozen=True)
class ControlConfig:
    """The controller's architecture. The downsampling factors are the video VAE's (pixel frames 1 + 4m ->
    latent frames 1 + m, 8x8 pixels -> one latent pixel)."""

    signal_channels: int = 1  # channels of the structure video (control/signals.py maps have one)
    temporal_downsample: int = 4
    spatial_downsample: int = 8
    conv_channels: int = 32  # of the convolutions at the latent grid
    num_blocks: int = 2  # K
    # The encoder's width (None: the base's). A narrower encoder keeps one token per latent patch, the base's
    # head size and fewer heads; its text stream enters through a linear map and P_j maps back to the base's width.
    hidden_size: int | None = None

    def __post_init__(self) -> None:
        if self.temporal_downsample < 1 or self.spatial_downsample < 1:
            raise ValueError("temporal_downsample and spatial_downsample must be >= 1")
        if self.signal_channels < 1 or self.conv_channels < 1 or self.num_blocks < 0:
            raise ValueError("signal_channels and conv_channels must be >= 1, num_blocks >= 0")
        if self.hidden_size is not None and self.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {self.hidden_size}")

    def width(self, cfg: SUVConfig, tensor_parallel: int = 1) -> int:
        """The encoder's width for the base `cfg` (ValueError if it does not fit the base's heads, or its heads
        do not split over `tensor_parallel` ranks)."""
        width = self.hidden_size or cfg.hidden_size
        if width % cfg.head_dim or width > cfg.hidden_size:
            raise ValueError(f"the controller's hidden size {width} must be a multiple of the base's head size "
                             f"{cfg.head_dim} and at most the base's hidden size {cfg.hidden_size}")
        if (width // cfg.head_dim) % tensor_parallel:
            raise ValueError(f"the controller's hidden size {width} gives {width // cfg.head_dim} heads; its "
                             f"heads do not split over --tensor-model-parallel-size {tensor_parallel}")
        return width

    def pixel_shape(self, latent_thw: tuple[int, int, int]) -> tuple[int, int, int]:
        """(T, H, W) of the structure video that matches a latent of (t, h, w)."""
        t, h, w = latent_thw
        return (t - 1) * self.temporal_downsample + 1, h * self.spatial_downsample, w * self.spatial_downsample


def fold_to_latent_grid(video: Tensor, conv: nn.Conv3d, ft: int, fs: int) -> Tensor:
    """`conv` (a 1x1x1 convolution over the (c, ft, fs, fs)-ordered channels of the space-to-depth folded video)
    applied to (B, C, 1 + ft*m, H, W) -> (B, out, 1 + m, H/fs, W/fs). The first frame forms a latent frame of its
    own, as the causal video VAE's does, as if padded in front by ft - 1 copies of itself.

    Computed as the equivalent strided convolution over the pixels, with the kernel as a (C, ft, fs, fs) view of
    the folded weight and the first frame's taps summed over time: the same linear map without materialising the
    folded video (on CPU several times cheaper than folding, then convolving: docs/PERFORMANCE.md)."""
    b, c = video.shape[:2]
    kernel = conv.weight.view(conv.out_channels, c, ft, fs, fs)
    first = F.conv2d(video[:, :, 0], kernel.sum(2), conv.bias, stride=fs).unsqueeze(2)
    if video.shape[2] == 1:  # an image: its one frame is the whole latent (conv3d refuses zero frames)
        return first
    rest = F.conv3d(video[:, :, 1:], kernel, conv.bias, stride=(ft, fs, fs))
    return torch.cat([first, rest], dim=2)


class LatentGridFold(nn.Conv3d):
    """`fold_to_latent_grid` as a module holding its 1x1x1 convolution: called as a module, megatron's pre-forward
    hook waits for its weights first (--overlap-param-gather gathers each module's own parameters there; a
    forward that read a child's weights without calling it would compute with the previous step's)."""

    def __init__(self, signal_channels: int, out_channels: int, ft: int, fs: int, dtype: torch.dtype) -> None:
        super().__init__(signal_channels * ft * fs * fs, out_channels, 1, dtype=dtype)
        self.ft, self.fs = ft, fs

    def forward(self, video: Tensor) -> Tensor:
        return fold_to_latent_grid(video, self, self.ft, self.fs)


class ProjectionLinear(RowParallelLinear):
    """Row-parallel; at TP = 1 one F.linear (megatron's TP autograd functions are identities there: their costs
    are skipped). A module call either way, so megatron's pre-forward hook waits for its weights (see
    LatentGridFold)."""

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.tensor_parallel = config.tensor_model_parallel_size

    def forward(self, input_: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.tensor_parallel == 1:
            return F.linear(input_, self.weight, self.bias), None
        return super().forward(input_)


def _zeros(weight: Tensor) -> None:
    nn.init.zeros_(weight)


class SignalBlock(nn.Module):
    """One of E's K transformer blocks: self-attention over the signal's tokens (per-head qk RMSNorm and the base's
    3D RoPE, as the base's blocks) and a GELU-tanh MLP, each behind an adaLN modulation and gate from the base's
    timestep embedding. No text stream. Heads split over TP (column-parallel q/k/v laid out head by head,
    row-parallel output); the input is whole on every TP rank (no sequence parallelism inside the controller)."""

    def __init__(self, width: int, cfg: SUVConfig, config: ModelParallelConfig, ops: BlockElementwise = EAGER) -> None:
        super().__init__()
        eps, dtype, init = cfg.norm_eps, config.params_dtype, normal_init(cfg.init_std)
        self.head_dim, self.scale, self.backend = cfg.head_dim, cfg.head_dim ** -0.5, cfg.attention_backend
        self.ops = ops
        local = without_sequence_parallel(config)
        self.modulation = Modulation(cfg.timestep_embed_dim, 6 * width, local, cfg.init_std)
        self.norm1, self.norm2 = LayerNorm(width, eps, dtype, ops), LayerNorm(width, eps, dtype, ops)
        # output rows ordered (head, q|k|v, head_dim): each TP rank's partition holds whole heads' q, k and v
        self.qkv = ColumnParallelLinear(width, 3 * width, config=local, init_method=init, bias=True,
                                        gather_output=False)
        self.norm_q, self.norm_k = (HeadRMSNorm(cfg.head_dim, eps, dtype, ops) for _ in range(2))
        self.out = RowParallelLinear(width, width, config=local, init_method=init, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)
        self.fc1 = ColumnParallelLinear(width, 4 * width, config=local, init_method=init, bias=False,
                                        gather_output=False)
        self.fc2 = RowParallelLinear(4 * width, width, config=local, init_method=init, bias=False,
                                     input_is_parallel=True, skip_bias_add=False)

    def forward(self, r: Tensor, temb: Tensor, rope: tuple[Tensor, Tensor], key_valid: Tensor | None) -> Tensor:
        """r (N, B, width) -> (N, B, width); temb (B, E) fp32; rope (N, head_dim) cos, sin; key_valid (B, N)."""
        n, b = r.shape[:2]
        shift, scale, gate, shift2, scale2, gate2 = self.modulation(temb).chunk(6, dim=-1)
        q, k, v = self.qkv(self.norm1(r, shift, scale))[0].view(n, b, -1, 3, self.head_dim).unbind(3)
        q, k = self.norm_q(q, rope), self.norm_k(k, rope)
        a = attention(q, k, v, key_valid, scale=self.scale, backend=self.backend)
        r = self.ops.gated_residual(r, gate, self.out(a.flatten(2))[0])
        return self.ops.gated_residual(r, gate2, self.fc2(self.ops.gelu(self.fc1(self.norm2(r, shift2, scale2))[0]))[0])


class StructureEncoder(nn.Module):
    """E: structure video (B, C, T, H, W) -> R (N, B, width), tokens in the base's (t, h, w) order.
    The downsampling folds the signal to the latent grid (space-to-depth and a 1x1x1 convolution, run as one
    strided convolution: `fold_to_latent_grid`), then a 3x3x3 convolution and the base's patch size as a strided
    convolution. No convolution stack at pixel resolution: at small models it costs more than the whole denoiser."""

    def __init__(self, control: ControlConfig, cfg: SUVConfig, config: ModelParallelConfig,
                 ops: BlockElementwise = EAGER) -> None:
        """`ops`: the blocks' elementwise regions, eager or compiled (the base's, models/suv_mmdit/elementwise.py)."""
        super().__init__()
        dtype, ch = config.params_dtype, control.conv_channels
        self.control, self.patch = control, cfg.patch_size
        self.width = control.width(cfg, config.tensor_model_parallel_size)
        self.conv_in = LatentGridFold(control.signal_channels, ch, control.temporal_downsample,
                                      control.spatial_downsample, dtype)
        self.conv_mid = nn.Conv3d(ch, ch, 3, padding=1, dtype=dtype)
        p = cfg.patch_size
        self.patch_embed = nn.Conv3d(ch, self.width, (1, p, p), stride=(1, p, p), dtype=dtype)
        self.blocks = nn.ModuleList(SignalBlock(self.width, cfg, config, ops) for _ in range(control.num_blocks))

    def forward(self, signal: Tensor, temb: Tensor, rope: tuple[Tensor, Tensor], video_valid: Tensor | None,
                grid: tuple[int, int, int]) -> Tensor:
        t, hp, wp = grid
        expected = self.control.pixel_shape((t, hp * self.patch, wp * self.patch))
        if signal.dim() != 5 or signal.shape[1] != self.control.signal_channels or tuple(signal.shape[2:]) != expected:
            raise ValueError(f"structure signal must be (B, {self.control.signal_channels}, *{expected}) for this "
                             f"latent, got {tuple(signal.shape)}")
        h = self.conv_in(signal.to(self.conv_in.weight.dtype))
        h = F.silu(self.conv_mid(F.silu(h)))
        r = self.patch_embed(h).flatten(2).permute(2, 0, 1)  # (N, B, D), (t, h, w) order
        for block in self.blocks:
            r = block(r, temb, rope, video_valid)
        return r


class Projector(nn.Module):
    """P_j for the blocks of one pipeline stage: row-parallel Linear(width -> H) each, zero-initialised; under
    Megatron-SP its reduce-scatter yields this TP rank's sequence shard, as X_j is split."""

    def __init__(self, cfg: SUVConfig, config: ModelParallelConfig, blocks: range, width: int) -> None:
        super().__init__()
        self.width, self.tensor_parallel = width, config.tensor_model_parallel_size
        self.linears = nn.ModuleDict({
            str(j): ProjectionLinear(width, cfg.hidden_size, config=config, init_method=_zeros, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)
            for j in blocks})

    def forward(self, index: int, rows: Tensor) -> Tensor:
        """rows (S, B, width) of R, whole on every TP rank -> F_j (this rank's shard under SP)."""
        linear = self.linears[str(index)]
        return linear(rows if self.tensor_parallel == 1 else scatter_to_tensor_model_parallel_region(rows))[0]


def rows_in_block_layout(features: Tensor, block: SUVBlock, n_pad: int) -> Tensor:
    """R (N, B, H) in natural order -> the rows X has after `block` on this rank, all TP slots: padded as the
    model pads X (SP / CP), then under context parallelism this CP rank's tokens of the block's layout."""
    rows = pad_sequence(features, n_pad)
    context = block.context_parallel
    if context is not None:
        rows = rows.index_select(0, context.cp.ids(context.plan.layout, n_pad, device=rows.device))
    return rows


class StructureController(nn.Module):
    """E (first pipeline stage only) and the projectors of this stage's blocks."""

    def __init__(self, control: ControlConfig, base: SUVMMDiT) -> None:
        super().__init__()
        self.control = control
        self.encoder = (StructureEncoder(control, base.cfg, base.config, base.block_ops) if base.pre_process
                        else None)
        self.features_cross_stages = not base.post_process  # R travels in the pipeline carry
        self.projector = Projector(base.cfg, base.config, base.stage.blocks, control.width(base.cfg))


@dataclass(frozen=True)
class StructureControl:
    """One forward's binding of the controller to its structure signal: the `BlockControl` the SUV model calls."""

    controller: StructureController
    signal: Tensor | None  # None on stages after the first (R arrives in the pipeline carry)

    def encode(self, temb: Tensor, rope: tuple[Tensor, Tensor], video_valid: Tensor | None,
               grid: tuple[int, int, int], hidden_size: int) -> Tensor:
        if self.controller.encoder is None or self.signal is None:
            raise RuntimeError("the structure encoder runs on the first pipeline stage, with a structure signal")
        r = self.controller.encoder(self.signal, temb, rope, video_valid, grid)
        # the pipeline carry's rows have the base's width: a narrower R crossing stages is zero-padded
        narrow = r.shape[-1] < hidden_size
        return F.pad(r, (0, hidden_size - r.shape[-1])) if narrow and self.controller.features_cross_stages else r

    def inject(self, block: SUVBlock, x: Tensor, features: Tensor, n_pad: int) -> Tensor:
        width = self.controller.projector.width
        rows = features[..., :width] if features.shape[-1] > width else features
        f = self.controller.projector(block.spec.index, rows_in_block_layout(rows, block, n_pad))
        return x + f.to(x.dtype)


class ControlledSUV(nn.Module):
    """A frozen SUV denoiser (one pipeline stage of it) with a trainable structure controller. Exposes what
    megatron's schedules and the training loop read from a model chunk."""

    def __init__(self, base: SUVMMDiT, control: ControlConfig) -> None:
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        self.controller = StructureController(control, base)
        self.cfg, self.config, self.model_type = base.cfg, base.config, base.model_type
        self.pre_process, self.post_process = base.pre_process, base.post_process
        self.share_embeddings_and_output_weights = False

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor | None] | None) -> None:
        self.base.set_input_tensor(input_tensor)

    def attention_sparsity(self) -> list[float]:
        """The base's blocks, then the encoder's K dense blocks. Attention costs scale with the width, so a
        narrower encoder's block counts as sparsity base width / its width (training/flops.py). An upper bound:
        training/flops.py counts every block over video and text tokens, the encoder attends over video tokens
        only (text is under 1 % of the tokens at the released sizes)."""
        control = self.controller.control
        return self.base.attention_sparsity() + [self.cfg.hidden_size / control.width(self.cfg)] * control.num_blocks

    def pipeline_shapes(self, batch: int, latent_thw: tuple[int, int, int], text_len: int,
                        ) -> tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]:
        cfg = self.base.cfg
        n = latent_thw[0] * (latent_thw[1] // cfg.patch_size) * (latent_thw[2] // cfg.patch_size)
        return self.base.pipeline_shapes(batch, latent_thw, text_len, control_rows=n)

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                pooled_projections: Tensor, attention_mask: Tensor | None, encoder_attention_mask: Tensor | None,
                structure: Tensor | None = None) -> Tensor:
        """`structure`: the (B, C, T, H, W) structure video (needed on the first pipeline stage)."""
        if self.pre_process and structure is None:
            raise ValueError("the controlled model needs a structure signal on the first pipeline stage")
        control = StructureControl(self.controller, structure)
        return self.base(hidden_states, timestep, encoder_hidden_states, pooled_projections, attention_mask,
                         encoder_attention_mask, control=control)


__all__ = ["ControlConfig", "ControlledSUV", "Projector", "StructureControl", "StructureController",
           "StructureEncoder", "rows_in_block_layout"]
