"""Kubernetes manifests: a Kubeflow PyTorchJob (GPU) or a Volcano Job (Ascend NPU, `huawei.com/Ascend910`).

Both use the static rendezvous: PyTorchJob gives every pod MASTER_ADDR (the master pod's service) and RANK
(the pod index); Volcano's `svc` plugin gives pods stable names `<job>-worker-<i>.<job>` and its `env` plugin
the index VC_TASK_INDEX.

A stopped pod (preemption, eviction) gets SIGTERM and `termination_grace_seconds` before SIGKILL; torchrun
forwards SIGTERM to the trainers and waits for them that long minus a minute (`PET_SHUTDOWN_TIMEOUT`, its
default is 30 s), so they save before they exit. A restarted job resumes (`--load` = `--save`, commands.py).
"""

from __future__ import annotations

import copy
from typing import Any

from megatron_video.launch.commands import node_command
from megatron_video.launch.job import JobSpec

GPU_RESOURCE = "nvidia.com/gpu"
NPU_RESOURCE = "huawei.com/Ascend910"


def _volumes(job: JobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                                     "sizeLimit": job.kubernetes.shm_size}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    for m in job.mounts:
        if m.claim is not None:
            volumes.append({"name": m.name, "persistentVolumeClaim": {"claimName": m.claim,
                                                                       "readOnly": m.read_only}})
        else:
            volumes.append({"name": m.name, "hostPath": {"path": m.host_path, "type": "Directory"}})
        mounts.append({"name": m.name, "mountPath": m.mount_path, "readOnly": m.read_only})
    return volumes, mounts


def _container(job: JobSpec, name: str, command: str, extra_env: dict[str, str]) -> dict[str, Any]:
    if not job.image:
        raise ValueError("a Kubernetes job needs `image`")
    k = job.kubernetes
    resource = NPU_RESOURCE if job.device == "npu" else GPU_RESOURCE
    limits: dict[str, Any] = {resource: job.devices_per_node}
    requests: dict[str, Any] = {resource: job.devices_per_node}
    for key, value in (("cpu", k.cpu), ("memory", k.memory)):
        if value is not None:
            limits[key] = requests[key] = value
    env = {**job.env, "PET_SHUTDOWN_TIMEOUT": str(max(k.termination_grace_seconds - 60, 30)), **extra_env}
    _, mounts = _volumes(job)
    container: dict[str, Any] = {
        "name": name, "image": job.image, "imagePullPolicy": "IfNotPresent",
        "command": ["bash", "-c", command],
        "env": [{"name": key, "value": value} for key, value in sorted(env.items())],
        "resources": {"limits": limits, "requests": requests},
        "volumeMounts": mounts,
    }
    if job.workdir:
        container["workingDir"] = job.workdir
    return container


def _pod_spec(job: JobSpec, container: dict[str, Any], restart: str) -> dict[str, Any]:
    k = job.kubernetes
    volumes, _ = _volumes(job)
    spec: dict[str, Any] = {"restartPolicy": restart, "containers": [container], "volumes": volumes,
                            "terminationGracePeriodSeconds": k.termination_grace_seconds}
    if k.node_selector:
        spec["nodeSelector"] = dict(k.node_selector)
    if k.service_account:
        spec["serviceAccountName"] = k.service_account
    if k.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    return spec


def _metadata(job: JobSpec) -> dict[str, Any]:
    k = job.kubernetes
    meta: dict[str, Any] = {"name": job.name, "namespace": k.namespace,
                            "labels": {"app.kubernetes.io/name": "megatron-video", **k.labels}}
    if k.annotations:
        meta["annotations"] = dict(k.annotations)
    return meta


def pytorchjob_manifest(job: JobSpec) -> dict[str, Any]:
    """Kubeflow training-operator PyTorchJob: one Master pod and nodes - 1 Worker pods, one per node."""
    job.validate()
    command = node_command(job, "static", "${RANK}", "${MASTER_ADDR}")
    container = _container(job, "pytorch", command, {})  # the operator requires the name "pytorch"
    container["ports"] = [{"name": "pytorchjob-port", "containerPort": job.master_port}]

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": {"spec": _pod_spec(job, copy.deepcopy(container), "OnFailure")}}

    replicas = {"Master": replica(1)}
    if job.nodes > 1:
        replicas["Worker"] = replica(job.nodes - 1)
    spec: dict[str, Any] = {"runPolicy": {"backoffLimit": job.kubernetes.max_retry, "cleanPodPolicy": "Running"},
                            "pytorchReplicaSpecs": replicas}
    if job.kubernetes.queue:
        spec["runPolicy"]["schedulingPolicy"] = {"queue": job.kubernetes.queue, "minAvailable": job.nodes}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _metadata(job), "spec": spec}


def volcano_manifest(job: JobSpec) -> dict[str, Any]:
    """Volcano Job with gang scheduling (minAvailable = nodes): one task of `nodes` pods."""
    job.validate()
    master = f"{job.name}-worker-0.{job.name}"
    command = node_command(job, "static", "${VC_TASK_INDEX}", master)
    extra = {"MASTER_ADDR": master, "MASTER_PORT": str(job.master_port)}
    if job.device == "npu":
        extra["HCCL_CONNECT_TIMEOUT"] = job.env.get("HCCL_CONNECT_TIMEOUT", "1200")
    container = _container(job, "worker", command, extra)
    container["ports"] = [{"name": "rendezvous", "containerPort": job.master_port}]
    spec: dict[str, Any] = {
        "minAvailable": job.nodes, "schedulerName": "volcano", "maxRetry": job.kubernetes.max_retry,
        "plugins": {"svc": [], "env": []},
        "policies": [{"event": "PodEvicted", "action": "RestartJob"},
                     {"event": "PodFailed", "action": "RestartJob"}],
        "tasks": [{"name": "worker", "replicas": job.nodes,
                   "template": {"spec": _pod_spec(job, container, "Never")}}],
    }
    metadata = _metadata(job)
    if job.device == "npu":  # MindCluster's device plugin and Volcano read it from the pods (and the job)
        labels = {"ring-controller.atlas": job.kubernetes.ring_controller}
        spec["tasks"][0]["template"]["metadata"] = {"labels": labels}
        metadata["labels"] = {**labels, **metadata["labels"]}
    if job.kubernetes.queue:
        spec["queue"] = job.kubernetes.queue
    return {"apiVersion": "batch.volcano.sh/v1alpha1", "kind": "Job", "metadata": metadata, "spec": spec}


def kubernetes_manifest(job: JobSpec, kind: str | None = None) -> dict[str, Any]:
    """PyTorchJob for GPUs, Volcano for Ascend NPUs, unless `kind` ("pytorchjob" | "volcano") says otherwise."""
    kind = kind or ("volcano" if job.device == "npu" else "pytorchjob")
    if kind == "pytorchjob":
        return pytorchjob_manifest(job)
    if kind == "volcano":
        return volcano_manifest(job)
    raise ValueError(f"kind must be 'pytorchjob' or 'volcano', got {kind!r}")


__all__ = ["GPU_RESOURCE", "NPU_RESOURCE", "kubernetes_manifest", "pytorchjob_manifest", "volcano_manifest"]
