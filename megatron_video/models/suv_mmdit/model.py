"""The SUV (sparse U-shaped) MMDiT denoiser of Open-Sora Plan v1.5, tensor-parallel with megatron-core.

Reads top to bottom like the forward specification (docs/DESIGN.md §5-6):
embeddings (section 2-3) -> dual-stream blocks with skiparse joint attention (4-6) in a U-shape with long
skips (7) -> final norms, projection and unpatchify (8-10). Activations are sequence-first (S, B, H); under
Megatron sequence parallelism the video and text streams are split along S over the TP group between the
tensor-parallel regions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    checkpoint,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from torch import Tensor, nn

from megatron_video.models.attention import attention
from megatron_video.models.suv_mmdit.config import BlockSpec, SUVConfig
from megatron_video.models.suv_mmdit.context_parallel import attach_context_parallel
from megatron_video.models.suv_mmdit.elementwise import EAGER, BlockElementwise, block_elementwise
from megatron_video.models.suv_mmdit.layers import (
    HeadRMSNorm,
    LayerNorm,
    Modulation,
    gather_shared_input,
    mark_sequence_parallel,
    normal_init,
    sequence_parallel_on,
    tp_world_size,
    without_sequence_parallel,
)
from megatron_video.models.suv_mmdit.pipeline import (
    CarryLayout,
    PipelineStage,
    pack_carry,
    unpack_controlled_carry,
    whole_model,
)
from megatron_video.models.suv_mmdit.rope import rope_cos_sin
from megatron_video.models.suv_mmdit.skiparse import (
    joint_attention,
    joint_attention_in_order,
    pad_sequence,
    valid_or_all,
)
from megatron_video.models.suv_mmdit.stage_order import StageOrders, move

# ---------------------------------------------------------------------------------------------- embeddings


class PatchEmbed(nn.Module):
    """Per-frame 2x2 stride-2 convolution; tokens flattened in (t, h, w) order, sequence-first."""

    def __init__(self, cfg: SUVConfig, dtype: torch.dtype) -> None:
        super().__init__()
        p = cfg.patch_size
        self.in_channels = cfg.in_channels
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p, dtype=dtype)
        # Inpainting conditioning channels (DESIGN §10): the input conv over [latent | condition] split in two,
        # so `proj` keeps the released shape and the new part starts at zero (= the T2V model at step 0).
        self.cond_proj = None
        if cfg.condition_channels:
            self.cond_proj = nn.Conv2d(cfg.condition_channels, cfg.hidden_size, kernel_size=p, stride=p,
                                       bias=False, dtype=dtype)
            nn.init.zeros_(self.cond_proj.weight)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = latent.shape
        frames = latent.transpose(1, 2).reshape(b * t, c, h, w).to(self.proj.weight.dtype)
        tokens = self.proj(frames[:, :self.in_channels])  # (B*T, D, h', w')
        if self.cond_proj is not None:
            tokens = tokens + self.cond_proj(frames[:, self.in_channels:])
        d, hp, wp = tokens.shape[1:]
        return tokens.reshape(b, t, d, hp, wp).permute(1, 3, 4, 0, 2).reshape(t * hp * wp, b, d)


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t f_j) | sin(t f_j)], f_j = 10000^(-j / (dim/2)); fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> silu -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, dtype=dtype)
        self.linear_2 = nn.Linear(dim, dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """temb = fp32(MLP(sinusoid(sigma * 1000)) + MLP(pooled CLIP embedding)), summed in the model dtype."""

    def __init__(self, cfg: SUVConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim = cfg.timestep_embed_dim
        self.timestep_embedder = MLPEmbedder(self.dim, self.dim, dtype)
        self.text_embedder = MLPEmbedder(cfg.pooled_projection_dim, self.dim, dtype)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        dtype = self.timestep_embedder.linear_1.weight.dtype
        tau = self.timestep_embedder(timestep_sinusoid(timestep, self.dim).to(dtype))
        return (tau + self.text_embedder(pooled.to(dtype))).float()


# ------------------------------------------------------------------------------------------------- blocks


class JointAttention(nn.Module):
    """q/k/v per stream (column-parallel), per-head qk RMSNorm per stream, 3D RoPE on video, joint skiparse
    attention over [video ; text], output projections per stream (row-parallel)."""

    def __init__(self, cfg: SUVConfig, config: ModelParallelConfig, spec: BlockSpec,
                 ops: BlockElementwise = EAGER) -> None:
        super().__init__()
        hidden, dtype, init = cfg.hidden_size, config.params_dtype, normal_init(cfg.init_std)
        self.spec, self.config = spec, config
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        # Swappable for context parallelism: the sequence layout (`layout_fn`, dense or skiparse) and the
        # kernel (`attn_fn`) are separate functions.
        self.layout_fn = joint_attention
        self.attn_fn = functools.partial(attention, backend=cfg.attention_backend)
        self.recompute_core = False  # selective recompute of core attention (set by the model from the flags)
        # q/k/v of one stream share one gathered input (one all-gather instead of three under SP).
        local = without_sequence_parallel(config)
        col = functools.partial(ColumnParallelLinear, hidden, hidden, config=local, init_method=init, bias=True,
                                gather_output=False, disable_grad_reduce=True)
        row = functools.partial(RowParallelLinear, hidden, hidden, config=config, init_method=init, bias=True,
                                input_is_parallel=True, skip_bias_add=False)
        self.to_q, self.to_k, self.to_v = col(), col(), col()
        self.add_q, self.add_k, self.add_v = col(), col(), col()
        self.to_out = row()
        self.to_add_out = row() if (not spec.context_pre_only or cfg.build_last_block_text_modules) else None
        self.norm_q, self.norm_k = (HeadRMSNorm(cfg.head_dim, cfg.norm_eps, dtype, ops) for _ in range(2))
        self.norm_added_q, self.norm_added_k = (HeadRMSNorm(cfg.head_dim, cfg.norm_eps, dtype, ops)
                                                for _ in range(2))
        if spec.context_pre_only:  # text queries cannot reach the output of the last block
            for module in (self.add_q, self.norm_added_q):
                module.requires_grad_(False)

    def _heads(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = linear(x)[0]
        return out.reshape(out.shape[0], out.shape[1], -1, self.head_dim)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
        video_valid: torch.Tensor, text_valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, c = gather_shared_input(x, self.config), gather_shared_input(c, self.config)
        q = self.norm_q(self._heads(self.to_q, x), rope)
        k = self.norm_k(self._heads(self.to_k, x), rope)
        v = self._heads(self.to_v, x)
        q_text = None if self.spec.context_pre_only else self.norm_added_q(self._heads(self.add_q, c))
        k_text, v_text = self.norm_added_k(self._heads(self.add_k, c)), self._heads(self.add_v, c)
        core = functools.partial(self.layout_fn, k=self.spec.k, mode=self.spec.mode, scale=self.scale,
                                 attn_fn=self.attn_fn)
        inputs = (q, k, v, q_text, k_text, v_text, video_valid, text_valid)
        if self.recompute_core and torch.is_grad_enabled():
            out, out_text = checkpoint(core, False, *inputs)
        else:
            out, out_text = core(*inputs)
        a = self.to_out(out.flatten(2))[0]
        a_text = self.to_add_out(out_text.flatten(2))[0] if out_text is not None else None
        return a, a_text


class FeedForward(nn.Module):
    """Linear(H -> 4H, column) -> GELU-tanh (fp32 inside the kernel) -> Linear(4H -> H, row); no biases."""

    def __init__(self, cfg: SUVConfig, config: ModelParallelConfig, ops: BlockElementwise = EAGER) -> None:
        super().__init__()
        self.gelu = ops.gelu
        init = normal_init(cfg.init_std)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, config=config, init_method=init,
                                        bias=False, gather_output=False)
        self.fc2 = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, config=config, init_method=init,
                                     bias=False, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)[0]
        return self.fc2(self.gelu(h))[0]


class LongSkip(nn.Module):
    """Decoder-stage input: Linear(2H -> H) over [main ; skip] per stream, initialised to [I | 0], no norm."""

    def __init__(self, cfg: SUVConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.video = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, dtype=dtype)
        self.text = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for linear in (self.video, self.text):
                linear.weight.zero_()
                linear.weight.diagonal().fill_(1.0)  # (H, 2H): identity on the main half
                linear.bias.zero_()

    def forward(self, x: Tensor, c: Tensor, x_skip: Tensor, c_skip: Tensor) -> tuple[Tensor, Tensor]:
        return self.video(torch.cat([x, x_skip], dim=-1)), self.text(torch.cat([c, c_skip], dim=-1))


class SUVBlock(nn.Module):
    """One dual-stream MMDiT block. Knows its place in the U-shape (`spec`: stage, k, single/group)."""

    def __init__(self, cfg: SUVConfig, config: ModelParallelConfig, spec: BlockSpec,
                 ops: BlockElementwise = EAGER) -> None:
        """`ops`: the elementwise regions (models/suv_mmdit/elementwise.py), eager or compiled."""
        super().__init__()
        hidden, eps, dtype = cfg.hidden_size, cfg.norm_eps, config.params_dtype
        self.spec, self.ops = spec, ops
        self.long_skip = LongSkip(cfg, dtype) if spec.skip_in is not None else None
        self.norm1 = Modulation(cfg.timestep_embed_dim, 6 * hidden, config, cfg.init_std)
        self.norm1_video, self.norm1_text = LayerNorm(hidden, eps, dtype, ops), LayerNorm(hidden, eps, dtype, ops)
        self.attn = JointAttention(cfg, config, spec, ops)
        self.norm2 = Modulation(cfg.timestep_embed_dim, 6 * hidden, config, cfg.init_std)
        self.norm2_video = LayerNorm(hidden, eps, dtype, ops)
        self.ff = FeedForward(cfg, config, ops)
        text_out = not spec.context_pre_only or cfg.build_last_block_text_modules
        self.norm2_text = LayerNorm(hidden, eps, dtype, ops) if text_out else None
        self.ff_text = FeedForward(cfg, config, ops) if text_out else None
        if spec.context_pre_only:  # kept only to hold released weights; they cannot reach the output
            for module in (self.attn.to_add_out, self.norm2_text, self.ff_text):
                if module is not None:
                    module.requires_grad_(False)
        for module in (self.long_skip, self.norm1_video, self.norm1_text, self.norm2_video, self.norm2_text):
            if module is not None:
                mark_sequence_parallel(module, config)
        self.recompute_ffn = False  # selective recompute (set by the model from the Megatron flags)
        self.context_parallel = None  # context_parallel.py BlockContext when CP > 1 (set by the model)

    def attention_half(self, x: Tensor, c: Tensor, temb: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                       video_valid: Tensor, text_valid: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale, gate, c_shift, c_scale, c_gate = self.norm1(temb).chunk(6, dim=-1)
        x_mod, c_mod = self.norm1_video(x, shift, scale), self.norm1_text(c, c_shift, c_scale)
        a, a_text = self.attn(x_mod, c_mod, (rope_cos, rope_sin), video_valid, text_valid)
        x = self.ops.gated_residual(x, gate, a)
        if not self.spec.context_pre_only:
            c = self.ops.gated_residual(c, c_gate, a_text)
        return x, c

    def ffn_half(self, x: Tensor, c: Tensor, temb: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale, gate, c_shift, c_scale, c_gate = self.norm2(temb).chunk(6, dim=-1)
        x = self.ops.gated_residual(x, gate, self.ff(self.norm2_video(x, shift, scale)))
        if not self.spec.context_pre_only:
            c = self.ops.gated_residual(c, c_gate, self.ff_text(self.norm2_text(c, c_shift, c_scale)))
        return x, c

    def forward(self, x: Tensor, c: Tensor, temb: Tensor, rope_cos: Tensor, rope_sin: Tensor, video_valid: Tensor,
                text_valid: Tensor, x_skip: Tensor | None = None, c_skip: Tensor | None = None,
                ) -> tuple[Tensor, Tensor]:
        """x (N, B, H) video and c (L, B, H) text streams (sequence shards under SP); temb (B, E) fp32; RoPE
        (N, head_dim); key validity (B, N) and (B, L); the paired encoder output if this block starts a
        decoder stage. In the stage order (stage_order.py) x, x_skip and RoPE hold the stage's N_p rows in its
        token order and the video validity is (k B, N_p / k) in this block's sub-sequence layout."""
        if self.context_parallel is not None:  # CP: streams into this block's layout, RoPE of its tokens
            x, c, (rope_cos, rope_sin) = self.context_parallel.block_input(
                self.long_skip, x, c, x_skip, c_skip, (rope_cos, rope_sin))
        elif self.long_skip is not None:
            if x_skip is None or c_skip is None:
                raise ValueError(f"block {self.spec.index} starts a decoder stage and needs its long-skip input")
            x, c = self.long_skip(x, c, x_skip, c_skip)
        x, c = self.attention_half(x, c, temb, rope_cos, rope_sin, video_valid, text_valid)
        if self.recompute_ffn and torch.is_grad_enabled():
            return checkpoint(self.ffn_half, False, x, c, temb)
        return self.ffn_half(x, c, temb)


# ------------------------------------------------------------------------------------------------- output


class FinalLayer(nn.Module):
    """norm_final (LayerNorm), then AdaNorm: LayerNorm * (1 + scale) + shift, then Linear(H -> p*p*C)."""

    def __init__(self, cfg: SUVConfig, config: ModelParallelConfig) -> None:
        super().__init__()
        hidden, dtype = cfg.hidden_size, config.params_dtype
        self.norm_final = LayerNorm(hidden, cfg.norm_eps, dtype)
        self.norm_out = Modulation(cfg.timestep_embed_dim, 2 * hidden, config, cfg.init_std)
        self.norm = LayerNorm(hidden, cfg.norm_eps, dtype)
        self.proj_out = nn.Linear(hidden, cfg.patch_out_features, dtype=dtype)
        for module in (self.norm_final, self.norm, self.proj_out):
            mark_sequence_parallel(module, config)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.norm_out(temb).chunk(2, dim=-1)
        return self.proj_out(self.norm(self.norm_final(x), shift, scale))


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: int, channels: int) -> torch.Tensor:
    """(N, B, p*p*C) with features ordered (a, e, c), c fastest -> (B, C, T, p*h', p*w')."""
    t, h, w = grid
    b = tokens.shape[1]
    x = tokens.reshape(t, h, w, b, patch, patch, channels)
    return x.permute(3, 6, 0, 1, 4, 2, 5).reshape(b, channels, t, h * patch, w * patch)


def video_token_validity(attention_mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, T, H, W) latent mask -> (B, N) bool; a token is valid if any latent pixel of its patch is."""
    b, t, h, w = attention_mask.shape
    m = attention_mask.reshape(b, t, h // patch, patch, w // patch, patch).amax(dim=(3, 5))
    return m.reshape(b, -1) > 0


# -------------------------------------------------------------------------------------------------- model


class BlockStack(nn.Module):
    """The blocks of one pipeline stage, registered under their global indices (`blocks.17....`), so parameter
    and checkpoint names do not depend on the pipeline split. Iterates in order; indexed by global index."""

    def __init__(self, blocks: list[SUVBlock]) -> None:
        super().__init__()
        for block in blocks:
            self.add_module(str(block.spec.index), block)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> SUVBlock:
        return self._modules[str(index)]


class BlockControl(Protocol):
    """A condition controller's hooks into the forward (models/control): features R on the first pipeline stage
    (whole, natural token order; rows of `hidden_size` where they cross pipeline stages) and X_j + F_j after
    block j in X_j's layout."""

    def encode(self, temb: Tensor, rope: tuple[Tensor, Tensor], video_valid: Tensor | None,
               grid: tuple[int, int, int], hidden_size: int) -> Tensor: ...

    def inject(self, block: SUVBlock, x: Tensor, features: Tensor, n_pad: int) -> Tensor: ...


class SUVMMDiT(nn.Module):
    """The denoiser: velocity = model(x_t, sigma * 1000, T5 states, CLIP pooled, masks).

    Under pipeline parallelism (`stage`, see pipeline.py) an instance holds one stage: the first stage owns the
    embeddings, the last the final layer; a stage that is not last returns the packed carry tensor for the
    next stage, and a stage that is not first reads its input from `set_input_tensor` (megatron's schedules
    call it right before each forward)."""

    def __init__(self, cfg: SUVConfig, config: ModelParallelConfig, stage: PipelineStage | None = None,
                 init_seed: int | None = None, compile_backend: str | None = None) -> None:
        """`init_seed`: reseed before each part (embeddings, every block, final layer), so a part starts from the
        same values whichever pipeline stage builds it; None draws from the generators as they are.
        `compile_backend`: torch.compile the blocks' elementwise regions with this backend (None: eager)."""
        from megatron.core.enums import ModelType

        from megatron_video.parallel.random import seed_model_part

        super().__init__()
        tp = tp_world_size()
        if config.tensor_model_parallel_size != tp:
            raise ValueError(f"config.tensor_model_parallel_size={config.tensor_model_parallel_size} but the "
                             f"initialised TP group has {tp} ranks")
        if cfg.num_heads % tp != 0:
            raise ValueError(f"num_heads {cfg.num_heads} is not divisible by TP size {tp}")
        self.cfg, self.config = cfg, config  # `config` is what megatron-core's get_model_config reads
        self.stage = stage if stage is not None else whole_model(cfg)
        # what megatron-core's schedules and finalize_model_grads read from a model chunk
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = self.stage.first, self.stage.last
        self.share_embeddings_and_output_weights = False  # nothing is tied across pipeline stages
        self.input_tensor: Tensor | None = None
        dtype = config.params_dtype
        part = functools.partial(seed_model_part, init_seed) if init_seed is not None else lambda index: None
        if self.pre_process:
            part(0)
            self.patch_embed = PatchEmbed(cfg, dtype)
            self.time_text_embed = TimeTextEmbed(cfg, dtype)
            self.caption_projection = nn.Linear(cfg.caption_channels, cfg.hidden_size, dtype=dtype)
        specs = cfg.block_specs()
        self.block_ops = block_elementwise(compile_backend)  # also what a controller's blocks run (models/control)
        blocks = []
        for i in self.stage.blocks:
            part(1 + i)
            blocks.append(SUVBlock(cfg, config, specs[i], self.block_ops))
        self.blocks = BlockStack(blocks)
        if self.post_process:
            part(1 + cfg.num_blocks)
            self.final = FinalLayer(cfg, config)
        self.recompute_blocks = self._configure_recompute(config)
        self.context_parallel = attach_context_parallel(cfg, config, self.blocks)  # None unless CP > 1
        self.stage_order = False
        self.use_stage_order(self.context_parallel is None and not sequence_parallel_on(config))

    def use_stage_order(self, enabled: bool) -> None:
        """Keep the video stream in each skiparse stage's token order between blocks (stage_order.py), or
        rearrange it inside every block's attention (the only way under CP or Megatron-SP; benchmarks and tests
        compare the two)."""
        if enabled and (self.context_parallel is not None or sequence_parallel_on(self.config)):
            raise ValueError("the stage order needs the whole video sequence on a rank: no CP, no Megatron-SP")
        if self.context_parallel is None:
            for block in self.blocks:
                block.attn.layout_fn = joint_attention_in_order if enabled else joint_attention
        self.stage_order = enabled

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor | None] | None) -> None:
        """megatron-core's schedules hand over the received carry (None on the first stage) before forward."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"the SUV model takes one pipeline input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def _configure_recompute(self, config: ModelParallelConfig) -> set[int]:
        """Megatron flags: full (per block: uniform with 1 layer, or block with the first n layers) or
        selective over `recompute_modules`: core_attn (Megatron's default: the attention kernel with its skiparse
        layout) and/or mlp (the FFN half of every block, as the training fork did)."""
        granularity = getattr(config, "recompute_granularity", None)
        if granularity is None:
            return set()
        if granularity == "selective":
            modules = getattr(config, "recompute_modules", None) or ["core_attn"]
            for block in self.blocks:
                block.attn.recompute_core = "core_attn" in modules
                block.recompute_ffn = "mlp" in modules
            return set()
        method, n = getattr(config, "recompute_method", None), getattr(config, "recompute_num_layers", None)
        indices = [block.spec.index for block in self.blocks]  # this stage's blocks
        if method == "uniform" and n == 1:
            return set(indices)
        if method == "block" and n is not None:  # the first n blocks of each pipeline stage, as Megatron
            return set(indices[:n])
        raise ValueError(f"full recompute supports method 'uniform' with 1 layer or 'block'; got {method!r}, {n}")

    def check_inputs(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                     pooled_projections: Tensor, attention_mask: Tensor | None,
                     encoder_attention_mask: Tensor | None) -> None:
        cfg = self.cfg
        channels = cfg.in_channels + cfg.condition_channels
        if hidden_states.dim() != 5 or hidden_states.shape[1] != channels:
            raise ValueError(f"hidden_states must be (B, {channels}, T, H, W), got {tuple(hidden_states.shape)}")
        b, _, t, h, w = hidden_states.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent H, W ({h}, {w}) must be multiples of the patch size {cfg.patch_size}")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t, h, w):
            raise ValueError(f"attention_mask must be (B, T, H, W) = {(b, t, h, w)}, got {tuple(attention_mask.shape)}")
        if tuple(timestep.shape) != (b,):
            raise ValueError(f"timestep must be (B,) = ({b},), got {tuple(timestep.shape)}")
        if pooled_projections.numel() != b * cfg.pooled_projection_dim:
            raise ValueError(f"pooled_projections must be (B, 1, {cfg.pooled_projection_dim})")
        if encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[-1] != cfg.caption_channels:
            raise ValueError(f"encoder_hidden_states must be (B, 1, L, {cfg.caption_channels})")
        text_len = encoder_hidden_states.shape[-2]
        if encoder_attention_mask is None:  # every text token valid
            return
        if encoder_attention_mask.numel() != b * text_len:
            raise ValueError(f"encoder_attention_mask must hold B x L = {b} x {text_len} entries")
        # checked on the device without waiting for it (a host read here would stall every forward); on CPU the
        # assert runs at once, on an accelerator it fails the device stream
        message = "every sample needs at least one valid text token (its keys are never empty then)"
        try:
            torch._assert_async((encoder_attention_mask.reshape(b, text_len) > 0).any(dim=1).all(), message)
        except RuntimeError as exc:
            raise ValueError(message) from exc

    def embed(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
              pooled_projections: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Latent, timestep, text -> video tokens x (N, B, H), text tokens c (L, B, H), conditioning temb."""
        b = hidden_states.shape[0]
        temb = self.time_text_embed(timestep, pooled_projections.reshape(b, -1))
        x = self.patch_embed(hidden_states)
        text = encoder_hidden_states.reshape(b, -1, self.cfg.caption_channels).transpose(0, 1)
        c = self.caption_projection(text.to(self.caption_projection.weight.dtype))
        return x, c, temb

    def split_sequence(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor], video_valid: Tensor | None,
                       text_valid: Tensor | None,
                       ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor | None, Tensor | None]:
        """Sequence parallelism: pad both streams to a multiple of the TP size with invalid tokens (masked as
        keys, outputs dropped, so they change nothing) and keep this rank's shard of each."""
        rope, video_valid, text_valid = self.pad_for_sequence_parallel(rope, video_valid, text_valid)
        tp = tp_world_size()
        x, c = pad_sequence(x, rope[0].shape[0]), pad_sequence(c, c.shape[0] + (-c.shape[0]) % tp)
        x, c = scatter_to_sequence_parallel_region(x), scatter_to_sequence_parallel_region(c)
        return x, c, rope, video_valid, text_valid

    def pad_for_sequence_parallel(self, rope: tuple[Tensor, ...], video_valid: Tensor | None,
                                  text_valid: Tensor | None,
                                  ) -> tuple[tuple[Tensor, ...], Tensor | None, Tensor | None]:
        """RoPE and key validity padded to the multiple of TP that `split_sequence` pads the streams to (a
        validity of None comes only with shapes that need no padding: `key_validity`)."""
        tp = tp_world_size()
        n = rope[0].shape[0]
        rope = tuple(pad_sequence(r, n + (-n) % tp) for r in rope)
        if video_valid is not None:
            video_valid = pad_sequence(video_valid.t(), rope[0].shape[0], False).t()
        if text_valid is not None:
            text_valid = pad_sequence(text_valid.t(), text_valid.shape[1] + (-text_valid.shape[1]) % tp, False).t()
        return rope, video_valid, text_valid

    def key_validity(self, attention_mask: Tensor | None, encoder_attention_mask: Tensor | None, b: int,
                     n: int, text_len: int, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """Key validity (B, N) of the video and (B, L) of the text tokens; a mask of None means every token is
        valid (known on the host when the batch is built). Both None when no mask is given and neither
        Megatron-SP nor CP pads this shape: the attention kernels then run without a mask (skiparse padding is
        the attention's own, per block). Decided from shapes: no host read."""
        tp = tp_world_size() if sequence_parallel_on(self.config) else 1
        if self.context_parallel is not None:
            padded = self.context_parallel.geometry.padded_tokens(n) != n or text_len % tp != 0
        else:
            padded = n % tp != 0 or text_len % tp != 0
        if attention_mask is None and encoder_attention_mask is None and not padded:
            return None, None
        video = None if attention_mask is None else video_token_validity(attention_mask, self.cfg.patch_size)
        text = None if encoder_attention_mask is None else encoder_attention_mask.reshape(b, -1) > 0
        return valid_or_all(video, b, n, device), valid_or_all(text, b, text_len, device)

    def run_blocks(self, x: Tensor, c: Tensor, temb: Tensor, rope: tuple[Tensor, ...], video_valid: Tensor,
                   text_valid: Tensor) -> Tensor:
        return self.run_stage_blocks(x, c, temb, rope, video_valid, text_valid, [])[0]

    def run_stage_blocks(self, x: Tensor, c: Tensor, temb: Tensor, rope: tuple[Tensor, ...], video_valid: Tensor,
                         text_valid: Tensor, skips: list[tuple[Tensor, Tensor]], control: BlockControl | None = None,
                         features: Tensor | None = None,
                         ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """This stage's blocks. `skips` is the long-skip stack on entry (LIFO: decoder stage s pops encoder
        stage S-1-s), empty on the first stage; returns the streams and the stack left for later stages.
        With a `control`, X_j = X_j + F_j after every block (F_j from the controller's `features`)."""
        skips = list(skips)
        # stage order: x (and each pending skip) in the token order of the block that produced it, natural at
        # both ends; otherwise everything stays natural (or in its CP layout) and `orders` is None
        orders = StageOrders(temb.shape[0], rope, video_valid, text_valid) if self.stage_order else None
        order = skip_orders = None
        if orders is not None:
            order, skip_orders = orders.natural, [orders.natural] * len(skips)
        for block in self.blocks:
            x_skip, c_skip = skips.pop() if block.spec.skip_in is not None else (None, None)
            block_rope, block_valid, n_pad = rope, video_valid, rope[0].shape[0]
            if orders is not None:
                target = orders.of(block.spec)
                x, order = move(x, order, target), target
                if x_skip is not None:
                    x_skip = move(x_skip, skip_orders.pop(), target)
                block_rope, block_valid = orders.rope(order), orders.key_validity(order, block.spec.mode)
                n_pad = order.n_pad
            args = (x, c, temb, *block_rope, block_valid, text_valid, x_skip, c_skip)
            if block.spec.index in self.recompute_blocks and torch.is_grad_enabled():
                x, c = checkpoint(block, False, *args)
            else:
                x, c = block(*args)
            if control is not None:  # the controller pads natural rows to n_pad: a no-op on rows already in order
                rows = orders.rows(features, order) if orders is not None else features
                x = control.inject(block, x, rows, n_pad)
            if block.spec.skip_out:
                skips.append((x, c))
                if orders is not None:
                    skip_orders.append(order)
        if orders is not None:
            x = move(x, order, orders.natural)
            skips = [(move(s, o, orders.natural), s_text) for (s, s_text), o in zip(skips, skip_orders)]
        return x, c, skips

    def carry_layout(self, batch: int, latent_thw: tuple[int, int, int], text_len: int, num_skips: int,
                     control_rows: int = 0) -> CarryLayout:
        """Layout of the tensor crossing a pipeline boundary of this model for one micro-batch."""
        config = self.config
        wire = config.pipeline_dtype if config.pipeline_dtype is not None else config.params_dtype
        video_rows = None
        if self.context_parallel is not None:  # this rank's share of the CP-padded video tokens
            geometry, (t, h, w) = self.context_parallel.geometry, latent_thw
            n = t * (h // self.cfg.patch_size) * (w // self.cfg.patch_size)
            video_rows = geometry.padded_tokens(n) // (geometry.cp * geometry.slots)
        layout = CarryLayout.for_batch(self.cfg, num_skips, batch, latent_thw, text_len, tp_world_size(),
                                       sequence_parallel_on(config), wire, config.params_dtype,
                                       self.stage.carry_slots, video_rows)
        return dataclasses.replace(layout, control_rows=control_rows) if control_rows else layout

    def attention_sparsity(self) -> list[int]:
        """The skiparse k of every block of the whole model (all pipeline stages): what a training step's
        attention costs (training/flops.py)."""
        return [spec.k for spec in self.cfg.block_specs()]

    def pipeline_shapes(self, batch: int, latent_thw: tuple[int, int, int], text_len: int, control_rows: int = 0,
                        ) -> tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]:
        """(receive shape, send shape) of this stage for micro-batches of this bucket (None: no p2p);
        `control_rows`: a controller's features travel too (models/control)."""
        recv = None if self.pre_process else self.carry_layout(batch, latent_thw, text_len,
                                                               len(self.stage.carried_in), control_rows).shape
        send = None if self.post_process else self.carry_layout(batch, latent_thw, text_len,
                                                                len(self.stage.carried_out), control_rows).shape
        return recv, send

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor, attention_mask: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None, control: BlockControl | None = None,
    ) -> torch.Tensor:
        """Masks of None: every latent / text token is valid (the attention runs without a mask when nothing
        else pads). `control`: a condition controller (models/control) adding its residual after every block."""
        self.check_inputs(hidden_states, timestep, encoder_hidden_states, pooled_projections, attention_mask,
                          encoder_attention_mask)
        cfg = self.cfg
        b, _, t, h, w = hidden_states.shape
        grid = (t, h // cfg.patch_size, w // cfg.patch_size)
        rope = rope_cos_sin(grid, cfg.head_dim, cfg.rope_base, hidden_states.device, self.config.params_dtype)
        n = grid[0] * grid[1] * grid[2]
        text_len = encoder_hidden_states.shape[-2]
        video_valid, text_valid = self.key_validity(attention_mask, encoder_attention_mask, b, n, text_len,
                                                    hidden_states.device)
        sequence_parallel = sequence_parallel_on(self.config)
        if self.pre_process:
            x, c, temb = self.embed(hidden_states, timestep, encoder_hidden_states, pooled_projections)
            skips: list[tuple[Tensor, Tensor]] = []
            features = (control.encode(temb, rope, video_valid, grid, cfg.hidden_size) if control is not None
                        else None)
            if self.context_parallel is not None:  # keep this CP rank's video tokens (text stays whole)
                x, c, rope, video_valid, text_valid = self.context_parallel.split_inputs(
                    x, c, rope, video_valid, text_valid)
            elif sequence_parallel:
                x, c, rope, video_valid, text_valid = self.split_sequence(x, c, rope, video_valid, text_valid)
        else:  # streams, pending long skips and temb arrive from the previous stage
            if self.input_tensor is None:
                raise RuntimeError("pipeline stage > 0 was called without set_input_tensor (use megatron's schedule)")
            layout = self.carry_layout(b, (t, h, w), text_len, len(self.stage.carried_in), n if control else 0)
            x, c, skips, temb, features = unpack_controlled_carry(layout, self.input_tensor)
            if self.context_parallel is not None:
                rope, video_valid, text_valid = self.context_parallel.pad_inputs(rope, video_valid, text_valid)
            elif sequence_parallel:
                rope, video_valid, text_valid = self.pad_for_sequence_parallel(rope, video_valid, text_valid)
        x, c, skips = self.run_stage_blocks(x, c, temb, rope, video_valid, text_valid, skips, control, features)
        if not self.post_process:
            layout = self.carry_layout(b, (t, h, w), text_len, len(self.stage.carried_out), n if control else 0)
            return pack_carry(layout, x, c, skips, temb, features)
        out = self.final(x, temb)
        if self.context_parallel is not None:  # the whole output on every CP rank
            out = self.context_parallel.gather_output(out, n)
        elif sequence_parallel:
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)[:n]
        return unpatchify(out, grid, cfg.patch_size, cfg.out_channels)


__all__ = ["BlockControl", "FinalLayer", "JointAttention", "SUVBlock", "SUVMMDiT", "unpatchify", "video_token_validity"]
