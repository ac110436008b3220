"""CPU backend: lets megatron-core (0.16.x) run on CPU processes with gloo.

megatron-core assumes CUDA in about a hundred places. This module redirects them, and is the only place in the
project that touches torch or megatron-core internals (the same idea as Ascend's `transfer_to_npu`):

- tensor factories and `.cuda()` / `.to('cuda')` give CPU tensors; `torch.cuda.current_device()` is "cpu";
- CUDA streams, events, synchronisation, NVTX ranges and cache control are no-ops;
- the CUDA RNG (megatron's model-parallel RNG tracker) is the CPU RNG;
- `Tensor.type()` reports `torch.cuda.*Tensor` to megatron's optimizer type checks;
- the gradient norm's L2 fallback (used without TransformerEngine and apex) runs as one multi-tensor norm;
- the distributed optimizer's parameter all-gather runs synchronously (see `_synchronous_param_gather`).

`prepare()` is idempotent and is only called for `--device cpu`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Any

import torch

_PATCHED = False

# Factories that accept `device=`; megatron-core passes 'cuda', torch.device('cuda') or current_device() to them.
_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "randperm",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "empty_strided", "linspace",
)


def _is_accelerator(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means an accelerator ordinal
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_device(device: Any) -> Any:
    return "cpu" if _is_accelerator(device) else device


def _redirect_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper._megatron_video_cpu = True  # marks the patch (idempotence, tests)
    return wrapper


def _tensor_to(original):
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        if args and _is_accelerator(args[0]):
            args = ("cpu", *args[1:])
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return original(self, *args, **kwargs)

    return to


def _tensor_type(original):
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        # Only megatron-core's dtype checks ("torch.cuda.FloatTensor", ...) see the CUDA name.
        if not args and not kwargs and isinstance(result, str) and result.startswith("torch.") \
                and not result.startswith("torch.cuda."):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.core"):
                return "torch.cuda." + result[len("torch."):]
        return result

    return type_


class _NullStream:
    """Stands in for torch.cuda.Stream / ExternalStream: every operation is already ordered on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _DropCpuRngWarning(logging.Filter):
    # megatron's RNG tracker warns when the CPU RNG moves inside a fork; on CPU the tracked RNG *is* the CPU RNG.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _noop(name: str):
    # A distinct function per patched name: torch._dynamo keys its trace rules by function object.
    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    noop.__name__ = noop.__qualname__ = name
    return noop


def _foreach_l2_norm(chunk_size: int, noop_flag: Any, tensor_lists: list[list[torch.Tensor]], per_tensor: bool,
                     *args: Any) -> tuple[torch.Tensor, None]:
    """megatron-core's `local_multi_tensor_l2_norm` contract (the L2 norm of all tensors of the first list, as a
    one-element float32 tensor; no per-tensor norms), computed with `torch._foreach_norm` and no host reads. The
    fallback builds a tensor from one Python float per parameter: hundreds of host reads per step on CPU. Same
    per-tensor kernels and the same final reduction, so the same value (tests/test_adaptor_cpu.py)."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _synchronous_param_gather(original):
    """megatron's bucket-group `start_param_sync`, always with force_sync. With --overlap-param-gather megatron
    dispatches each bucket group's all-gather as an asynchronous coalesced collective; on gloo (torch 2.13) that
    path corrupts the process heap now and then (a glibc abort or a SIGSEGV: about one run in ten of a short 2-rank
    training with the overlap). `bench/stress_gloo_allgather.py` reproduces it without megatron, mostly within
    5,000 rounds, and not with plain asynchronous all-gathers nor with the synchronous coalesced one used here
    (docs/PERFORMANCE.md). The gathers still happen where megatron asks for them (a bucket group's first forward
    pre-hook, or a forced sync), so when weights become current is unchanged; only the overlap, which a CPU does
    not have, goes."""

    @functools.wraps(original)
    def start_param_sync(self: Any, force_sync: bool = False) -> None:
        return original(self, force_sync=True)

    start_param_sync._megatron_video_cpu = True
    return start_param_sync


def prepare() -> None:
    global _PATCHED
    if _PATCHED:
        return
    cuda = torch.cuda

    # torch's device context (`with torch.device("meta")`, used by transformers' loading) recognises factories by
    # identity in a set it builds once from the `torch` namespace: build it now, with the original functions, so
    # the originals our wrappers call stay recognised.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not getattr(fn, "_megatron_video_cpu", False):
            setattr(torch, name, _redirect_factory(fn))

    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.Tensor.to = _tensor_to(torch.Tensor.to)  # type: ignore[method-assign]
    torch.Tensor.type = _tensor_type(torch.Tensor.type)  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]

    cuda.current_device = lambda: "cpu"
    cuda.set_device = _noop("set_device")
    cuda.synchronize = _noop("synchronize")
    cuda.empty_cache = _noop("empty_cache")
    cuda.Stream = _NullStream
    cuda.ExternalStream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.memory_stats = lambda device=None: {}
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.reset_peak_memory_stats = _noop("reset_peak_memory_stats")
    cuda.nvtx.range_push = _noop("range_push")
    cuda.nvtx.range_pop = _noop("range_pop")

    # The "CUDA" RNG is the CPU RNG.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = _noop("manual_seed_all")  # torch.manual_seed calls it after seeding the CPU
    cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mp_random.__name__).addFilter(_DropCpuRngWarning())

    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:  # neither TE nor apex present
        clip_grads.l2_norm_impl = _foreach_l2_norm

    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    if not getattr(_ParamAndGradBucketGroup.start_param_sync, "_megatron_video_cpu", False):
        _ParamAndGradBucketGroup.start_param_sync = _synchronous_param_gather(_ParamAndGradBucketGroup.start_param_sync)

    _PATCHED = True


def is_prepared() -> bool:
    return _PATCHED
