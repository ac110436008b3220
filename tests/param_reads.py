"""Which trainable parameters a forward reads before megatron's pre-forward hook has waited for them.

With --overlap-param-gather megatron-core 0.16.1 registers a forward pre-hook on every submodule of the DDP-wrapped
model (distributed_data_parallel.py `enable_forward_pre_hook`) that waits for the all-gather of that module's own
parameters only (`_make_forward_pre_hook`: `module.parameters(recurse=False)`). A forward that uses a parameter
before its own module was called (reading a child's `.weight` instead of calling the child) computes with what the
parameter buffer held before the gather: this rank's shard of the new weights, the previous step's elsewhere.

`EarlyParameterReads(module)` models that contract without megatron: as a torch function mode around a forward it
records each trainable parameter that an operation takes before a pre-hook of the parameter's own module fired.
Reading metadata (`.dtype`, `.shape`) is not an operation on the values and is not recorded."""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class EarlyParameterReads(TorchFunctionMode):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.names = {param: f"{owner}.{name}".lstrip(".") for owner, child in module.named_modules()
                      for name, param in child.named_parameters(recurse=False)}
        self.ready: set[torch.nn.Parameter] = set()
        self.reads: set[tuple[str, str]] = set()  # (parameter, operation)
        self._hooks = [child.register_forward_pre_hook(self._pre_hook) for child in module.modules()]

    def _pre_hook(self, child: torch.nn.Module, *_: Any) -> None:
        self.ready.update(child.parameters(recurse=False))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":  # attribute reads (dtype, shape, ...) are metadata
            for value in tree_flatten((args, kwargs))[0]:
                if isinstance(value, torch.nn.Parameter) and value.requires_grad and value not in self.ready:
                    self.reads.add((self.names.get(value, "?"), getattr(func, "__name__", str(func))))
        return func(*args, **kwargs)

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)
