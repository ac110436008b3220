"""One job description (YAML/JSON) for every scheduler: what to run, on how many devices, in which image.

    name: osp-video1
    nodes: 64
    devices_per_node: 8
    device: npu                     # gpu | npu
    image: registry.example.com/megatron-video:0.1
    workdir: /workspace/megatron-video
    script: pretrain_t2v.py         # a .py entry point (run under torchrun) or a launch .sh
    args: [--model-config, examples/opensoraplan1.5/model.yaml, ...]
    env: {STAGE: video1}
    mounts: [{name: data, host_path: /mnt/data, mount_path: /data}]   # and/or claim: <pvc name>
    slurm: {partition: a100, account: proj, time: "72:00:00"}
    kubernetes: {namespace: training, queue: default}

No credentials belong here: images are pulled with the cluster's own pull secrets (name them in
`kubernetes.image_pull_secrets`), and tokens come from the scheduler's environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from megatron_video.configfile import ConfigError, from_mapping, read_mapping

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")  # a DNS-1123 label, short enough for pod names
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_HINT = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY)", re.I)


@dataclass
class Mount:
    name: str
    mount_path: str
    host_path: str | None = None  # a node directory (Slurm: bound into the container; Kubernetes: hostPath)
    claim: str | None = None  # a Kubernetes PersistentVolumeClaim (used instead of host_path on Kubernetes)
    read_only: bool = False


@dataclass
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # HH:MM:SS or D-HH:MM:SS
    cpus_per_task: int | None = None
    mem: str | None = None
    output: str = "%x-%j.out"
    container: bool = True  # pyxis/enroot `--container-image`; false runs on the host environment
    # SIGUSR1 arrives this many seconds before the time limit: the trainers save and exit, the job is requeued
    signal_seconds: int = 600
    requeue: bool = True
    extra_directives: list[str] = field(default_factory=list)  # e.g. ["--exclusive", "--qos=high"]


@dataclass
class KubernetesOptions:
    namespace: str = "default"
    queue: str | None = None  # Volcano queue (also used for the PyTorchJob's gang scheduling)
    service_account: str | None = None
    image_pull_secrets: list[str] = field(default_factory=list)  # names of existing secrets only
    node_selector: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cpu: str | None = None
    memory: str | None = None
    shm_size: str = "64Gi"
    max_retry: int = 3
    # time between SIGTERM and SIGKILL when a pod is stopped: the trainers save a checkpoint in it
    termination_grace_seconds: int = 900
    # Ascend (Volcano): the pod label MindCluster's device plugin, operator and Volcano read to identify
    # Atlas pods (`ring-controller.atlas`: ascend-910 or ascend-{xxx}b, hiascend.com MindCluster docs,
    # "Pod labels of the cluster scheduling components", dlug_api_173)
    ring_controller: str = "ascend-910b"


@dataclass
class JobSpec:
    name: str
    nodes: int
    devices_per_node: int
    script: str
    device: str = "gpu"
    image: str | None = None
    workdir: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    master_port: int = 29500
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    kubernetes: KubernetesOptions = field(default_factory=KubernetesOptions)

    def validate(self) -> JobSpec:
        if not _NAME.match(self.name):
            raise ConfigError(f"job name {self.name!r} must be lower-case letters, digits and '-' (<= 52 chars)")
        if self.nodes < 1 or self.devices_per_node < 1:
            raise ConfigError(f"nodes ({self.nodes}) and devices_per_node ({self.devices_per_node}) must be >= 1")
        if self.device not in ("gpu", "npu"):
            raise ConfigError(f"device must be 'gpu' or 'npu', got {self.device!r}")
        if not (self.script.endswith(".py") or self.script.endswith(".sh")):
            raise ConfigError(f"script {self.script!r} must be a .py entry point or a .sh launch script")
        if self.slurm.signal_seconds < 60 or self.kubernetes.termination_grace_seconds < 60:
            raise ConfigError("slurm.signal_seconds and kubernetes.termination_grace_seconds must be >= 60: the "
                              "trainers need the time to finish a step and save")
        if not 1 <= self.master_port <= 65535:
            raise ConfigError(f"master_port must be a TCP port, got {self.master_port}")
        for key, value in self.env.items():
            if not _ENV.match(key):
                raise ConfigError(f"env: {key!r} is not a valid variable name")
            if _SECRET_HINT.search(key):
                raise ConfigError(f"env: {key!r} looks like a credential; use the scheduler's secret store "
                                  "(Kubernetes secrets, Slurm's environment), not the job file")
            if not isinstance(value, str):
                raise ConfigError(f"env: {key} must be a string (quote numbers in YAML), got {value!r}")
        names = set()
        for m in self.mounts:
            if m.host_path is None and m.claim is None:
                raise ConfigError(f"mount {m.name!r}: give host_path (Slurm, Kubernetes), claim (Kubernetes) or both")
            if not m.mount_path.startswith("/"):
                raise ConfigError(f"mount {m.name!r}: mount_path must be absolute, got {m.mount_path!r}")
            if not _NAME.match(m.name) or m.name in names:
                raise ConfigError(f"mount name {m.name!r} must be a unique DNS label")
            names.add(m.name)
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


def load_job(path: str) -> JobSpec:
    return job_from_mapping(read_mapping(path), source=path)


def job_from_mapping(data: dict[str, Any], source: str = "job") -> JobSpec:
    return from_mapping(JobSpec, data, source).validate()


__all__ = ["JobSpec", "KubernetesOptions", "Mount", "SlurmOptions", "job_from_mapping", "load_job"]
