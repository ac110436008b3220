"""Shared pieces of the context-parallel tests: inputs, and a rank worker that trains one step of the SUV model
through megatron's DDP and forward-backward schedule at a given TP x CP and reports loss and gradients."""

from __future__ import annotations

import torch

# (name, latent T, H, W): a video whose 48 tokens are a multiple of every k^2 (k <= 4), one whose 18 tokens are
# not (skiparse and CP padding), and an image (T = 1)
SHAPES = {"video": (3, 8, 8), "ragged": (3, 6, 4), "image": (1, 8, 6)}


def make_inputs(cfg, shape: tuple[int, int, int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Batch 2 with a partly invalid video mask and a padded caption; plus a regression target."""
    g = torch.Generator().manual_seed(seed)
    b, text_len = 2, 7
    t, h, w = shape
    mask = torch.ones(b, t, h, w, dtype=torch.long)
    mask[1, t - 1, :, w // 2:] = 0
    text_mask = torch.ones(b, 1, text_len, dtype=torch.long)
    text_mask[1, 0, 5:] = 0
    return {
        "hidden_states": torch.randn(b, cfg.in_channels, t, h, w, generator=g),
        "timestep": torch.tensor([250.0, 731.5]),
        "encoder_hidden_states": torch.randn(b, 1, text_len, cfg.caption_channels, generator=g),
        "pooled_projections": torch.randn(b, 1, cfg.pooled_projection_dim, generator=g),
        "attention_mask": mask,
        "encoder_attention_mask": text_mask,
        "target": torch.randn(b, cfg.out_channels, t, h, w, generator=g),
    }


def train_step_worker(cfg, weights, inputs_list, variants, count_bytes: bool = False) -> list[dict]:
    """For each (tp, cp, sequence_parallel, strategy[, megatron flags as item pairs]) and each input: build the
    model, load this rank's TP shard of the released-name `weights` (None: drawn here, the same on every rank),
    run one forward-backward through megatron's schedule (which scales the loss by the CP size) and
    finalize_model_grads (DDP over DP x CP), and report the loss, the output and the main grads in released
    names. With `count_bytes`, also the CP-group bytes of each step."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.context_parallel import set_context_parallel_strategy
    from megatron_video.models.suv_mmdit.state_dict_adapter import load_released, to_released
    from megatron_video.parallel import CommCounter, initialize_parallel

    if weights is None:  # every rank draws the same released-name weights from a TP = 1 model
        from tests.test_suv_tp import random_released_weights

        initialize_parallel()
        weights = random_released_weights(SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32,
                                                                          use_cpu_initialization=True)))
    results = []
    for variant in variants:
        tp, cp, sp, strategy = variant[:4]
        extra = dict(variant[4]) if len(variant) > 4 else {}  # megatron flags, e.g. recompute
        initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        config = megatron_config(cfg, tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp,
                                 params_dtype=torch.float32, use_cpu_initialization=True, **extra)
        model = SUVMMDiT(cfg, config)
        if cp > 1 and strategy != "skiparse":
            set_context_parallel_strategy(model, strategy)
        load_released(model, weights, tp, mpu.get_tensor_model_parallel_rank())
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        for index, inputs in enumerate(inputs_list):
            ddp.zero_grad_buffer()
            batch = dict(inputs)
            target = batch.pop("target")
            store: dict[str, torch.Tensor] = {}

            def forward_step(iterator, module, batch=batch, target=target, store=store):
                out = module(**batch)
                store["output"] = out.detach().clone()

                def loss_func(prediction):
                    loss = (prediction - target).pow(2).mean()
                    return loss, {"loss": loss.detach().clone()}

                return out, loss_func

            counter = CommCounter()
            with counter if count_bytes else _null():
                losses = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp], num_microbatches=1,
                    seq_length=1, micro_batch_size=2, forward_only=False)
            finalize_model_grads([ddp])
            grads = {name: p.main_grad.clone() for name, p in model.named_parameters() if p.requires_grad}
            entry = {
                "variant": variant, "input": index, "rank": dist.get_rank(),
                "tp_rank": mpu.get_tensor_model_parallel_rank(), "cp_rank": mpu.get_context_parallel_rank(),
                "loss": losses[0]["loss"].item(), "output": store["output"], "grads": to_released(grads, cfg),
            }
            if count_bytes:
                entry["bytes"] = {f"{op}/{size}": (s.calls, s.payload_bytes)
                                  for (op, size), s in counter.by_group_size.items()}
            results.append(entry)
    return results


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None
