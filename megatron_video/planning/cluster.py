"""A cluster description for the planner: device count, memory, peak FLOP/s and link bandwidths."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron_video.configfile import from_mapping, read_mapping


@dataclass(frozen=True)
class ClusterSpec:
    num_devices: int
    devices_per_node: int = 8
    memory_gib: float = 64.0
    peak_tflops: float = 313.0  # dense bf16/fp16 per device
    intra_node_gbps: float = 150.0  # achievable collective bandwidth per device inside a node, GB/s
    inter_node_gbps: float = 22.0  # per device across nodes (one NIC per device), GB/s
    compute_efficiency: float = 0.5  # achieved fraction of peak in the model's matmuls and attention
    reserved_gib: float = 4.0  # runtime, collective buffers, allocator fragmentation
    device: str = "npu"  # cuda | npu: only changes the launch flags printed

    def __post_init__(self) -> None:
        if self.num_devices < 1 or self.devices_per_node < 1:
            raise ValueError("num_devices and devices_per_node must be >= 1")
        if self.num_devices > self.devices_per_node and self.num_devices % self.devices_per_node != 0:
            raise ValueError(f"num_devices {self.num_devices} is not a whole number of "
                             f"{self.devices_per_node}-device nodes")
        for name in ("memory_gib", "peak_tflops", "intra_node_gbps", "inter_node_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.compute_efficiency <= 1:
            raise ValueError(f"compute_efficiency must be in (0, 1], got {self.compute_efficiency}")
        if not 0 <= self.reserved_gib < self.memory_gib:
            raise ValueError(f"reserved_gib must be in [0, memory_gib), got {self.reserved_gib}")
        if self.device not in ("cuda", "npu"):
            raise ValueError(f"device must be 'cuda' or 'npu', got {self.device!r}")

    def bandwidth(self, group_span: int) -> float:
        """Bytes/s of a collective whose ranks span `group_span` consecutive ranks (stride x size)."""
        gbps = self.intra_node_gbps if group_span <= self.devices_per_node else self.inter_node_gbps
        return gbps * 1e9

    def replace(self, **changes: Any) -> ClusterSpec:
        return dataclasses.replace(self, **changes)


# Per-device figures; the device count comes from the user. Bandwidths are achievable collective bus rates
# (not link peaks); efficiency is a typical large-matmul MFU. Adjust them for a given site.
DEVICE_PRESETS: dict[str, dict[str, Any]] = {
    "ascend-910b-64g": dict(devices_per_node=8, memory_gib=64.0, peak_tflops=313.0, intra_node_gbps=150.0,
                            inter_node_gbps=22.0, device="npu"),
    "h100-80g": dict(devices_per_node=8, memory_gib=80.0, peak_tflops=989.0, intra_node_gbps=360.0,
                     inter_node_gbps=45.0, device="cuda"),
    "a800-80g": dict(devices_per_node=8, memory_gib=80.0, peak_tflops=312.0, intra_node_gbps=160.0,
                     inter_node_gbps=22.0, device="cuda"),
}


def cluster_from(preset: str | None = None, path: str | None = None, **overrides: Any) -> ClusterSpec:
    """A cluster from a device preset and/or a JSON/YAML file, then explicit overrides (None values ignored)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in DEVICE_PRESETS:
            raise ValueError(f"unknown device preset {preset!r}; choose one of {sorted(DEVICE_PRESETS)}")
        values.update(DEVICE_PRESETS[preset])
    if path is not None:
        values.update(read_mapping(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "num_devices" not in values:
        raise ValueError("the cluster needs num_devices (e.g. --devices 512)")
    return from_mapping(ClusterSpec, values, path or "cluster")


__all__ = ["ClusterSpec", "DEVICE_PRESETS", "cluster_from"]
