"""The self-check's tensor-parallel probe lives on the device its input goes to.

On CPU every device is the host, so the test asks for the `meta` device: layers left where megatron-core's CPU
initialisation allocates them stay on `cpu` and the assertion names them (on a GPU the same mismatch made the
self-check raise "Expected all tensors to be on the same device")."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed


def _probe_devices(tp: int) -> list[str]:
    from megatron_video.parallel.initialize import initialize_parallel
    from megatron_video.parallel.selfcheck import tp_probe_layers

    initialize_parallel(tensor_model_parallel_size=tp)
    col, row = tp_probe_layers(tp, torch.device("meta"))
    return sorted({p.device.type for p in [*col.parameters(), *row.parameters()]})


@pytest.mark.slow
def test_tp_probe_layers_are_on_the_requested_device():
    assert run_distributed(_probe_devices, 2, 2) == [["meta"], ["meta"]]
