"""Extra memory a checkpoint save needs, relative to the model + optimizer state a rank holds anyway.

    python bench/bench_ckpt_save.py [--ranks 4] [--tp 1] [--preset small] [--format dp_sharded|fully_reshardable]

Builds the training components (megatron DDP, distributed optimizer with its Adam state, fp32 EMA) on CPU ranks,
then saves one checkpoint the way the training loop does. On CPU every tensor lives in host memory, so a rank's
extra memory is measured as its resident set: the kernel's high-water mark (`VmHWM`, reset through
`/proc/self/clear_refs` just before the save) minus the resident set just before it, plus the largest unique
Steady state: bytes of the parameters, the DDP gradient buffer, the optimizer's main parameters and moments and
the EMA held by that rank. Prints both per rank and the largest ratio (goal: <= 0.25). Also printed, not in the
ratio: the largest unique memory (USS, sampled every 5 ms) of the writer processes megatron forks. It is the
copy-on-write of the forked Python heap (~200 MiB per rank here, whatever the model size and format), not tensor
data: the writers write the parent's tensors through shared pages.

`--format fully_reshardable` measures what the stack saved before: megatron's fully_reshardable optimizer format
(without its memory-efficient mode) and the EMA gathered to full tensors for the save.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
from pathlib import Path


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _ChildPeak(threading.Thread):
    """Largest sum of the unique memory of this process's children, sampled while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_full_info().uss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.005)


def _steady_bytes(parts) -> int:
    from megatron_video.optim.adaptive_optimizer import leaf_optimizers

    total = sum(p.numel() * p.element_size() for p in parts.module.parameters())
    total += sum(b.grad_data.numel() * b.grad_data.element_size() for b in parts.model.buffers)
    for leaf in leaf_optimizers(parts.optimizer.optimizer):
        seen = set()
        for group in leaf.optimizer.param_groups:
            for main in group["params"]:
                state = leaf.optimizer.state[main]
                for tensor in [main, *state.values()]:
                    if tensor.dim() and tensor.data_ptr() not in seen:
                        seen.add(tensor.data_ptr())
                        total += tensor.numel() * tensor.element_size()
    if parts.ema is not None:
        total += parts.ema.local_numel() * 4
    return total


def _old_sharded_state(parts, model_sd) -> dict:
    """The state the loop saved before: fully_reshardable optimizer format, EMA all-reduced to full tensors."""
    from megatron_video.training.checkpointing import model_sharded_state_dict

    out = {"model": model_sd, "optimizer": parts.optimizer.sharded_state_dict(
        model_sd, is_loading=False, metadata={"distrib_optim_sharding_type": "fully_reshardable"})}
    plain = model_sharded_state_dict(parts.module, prefix="")
    full = parts.ema.full_state_dict()
    out["ema"] = {name: dataclasses.replace(plain[name], key="ema." + name, data=t, dtype=t.dtype)
                  for name, t in full.items()}
    return out


def _rank(root: str, preset: str, tp: int, fmt: str, ranks: int) -> dict:
    import gc

    import torch.distributed as dist

    from megatron_video.arguments import build_parser, validate_args
    from megatron_video.models.suv_mmdit.config import suv_config
    from megatron_video.parallel import initialize_parallel, set_seed
    from megatron_video.training.checkpointing import save_checkpoint
    from megatron_video.training.components import build_components, materialize_optimizer_state
    from megatron_video.training.loop import checkpoint_sharded_state

    initialize_parallel(tensor_model_parallel_size=tp)
    set_seed(0)
    args = build_parser().parse_args(["--use-distributed-optimizer", "--tensor-model-parallel-size", str(tp),
                                      "--micro-batch-size", "1", "--global-batch-size", str(ranks // tp)])
    validate_args(args, world_size=ranks)
    parts = build_components(args, suv_config(preset), train_iters=10)
    materialize_optimizer_state(parts.optimizer)  # Adam state as after the first step (zeros, same size)
    steady = _steady_bytes(parts)
    common = {"world_size": dist.get_world_size(), "iteration": 1}
    # one untimed save first: megatron starts its results-queue manager once, and imports settle
    save_checkpoint(Path(root) / "warm", 1, checkpoint_sharded_state(parts, loading=False), common)
    dist.barrier()
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident set
    children = _ChildPeak()
    children.start()
    started = time.monotonic()
    if fmt == "fully_reshardable":
        from megatron_video.training.checkpointing import model_sharded_state_dict

        state = _old_sharded_state(parts, model_sharded_state_dict(parts.module))
    else:
        state = checkpoint_sharded_state(parts, loading=False)
    save_checkpoint(Path(root) / fmt, 2, state, common)
    del state
    elapsed = time.monotonic() - started
    children.stop.set()
    children.join()
    return {"steady": steady, "parent_extra": max(0, _status("VmHWM") - before), "writers": children.peak,
            "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--format", choices=("dp_sharded", "fully_reshardable"), default="dp_sharded")
    parser.add_argument("--dir", default="/tmp/bench_ckpt_save")
    opts = parser.parse_args()

    import shutil

    from megatron_video.parallel.spawn import run_distributed

    shutil.rmtree(opts.dir, ignore_errors=True)
    results = run_distributed(_rank, opts.ranks, opts.dir, opts.preset, opts.tp, opts.format, opts.ranks,
                              timeout=1800)
    mib = 2**20
    print(f"{opts.format}, preset {opts.preset}, {opts.ranks} ranks, TP {opts.tp}")
    print("rank  steady MiB  extra (rank) MiB  ratio  writer processes USS MiB  save s")
    worst = 0.0
    for rank, r in enumerate(results):
        ratio = r["parent_extra"] / r["steady"]
        worst = max(worst, ratio)
        print(f"{rank:4d}  {r['steady'] / mib:10.1f}  {r['parent_extra'] / mib:16.1f}  {ratio:5.3f}"
              f"  {r['writers'] / mib:24.1f}  {r['seconds']:6.1f}")
    print(f"largest extra / steady: {worst:.3f} (goal <= 0.25)")
    shutil.rmtree(opts.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
