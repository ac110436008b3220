"""tools/submit: Slurm batch scripts and Kubernetes manifests from one job description (nothing is submitted)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from megatron_video.configfile import ConfigError
from megatron_video.launch.job import job_from_mapping
from megatron_video.launch.kubernetes import kubernetes_manifest
from megatron_video.launch.slurm import slurm_script
from megatron_video.launch.submit_cli import main

REPO = Path(__file__).resolve().parents[1]


def _job(**changes) -> dict:
    job = {
        "name": "osp-test", "nodes": 3, "devices_per_node": 4, "device": "gpu", "image": "reg.example/mv:1",
        "workdir": "/workspace/mv", "script": "pretrain_t2v.py",
        "args": ["--model-config", "m.yaml", "--lr", "6e-5", "--save", "/ckpt/with space"],
        "env": {"STAGE": "video1", "TP": "2"},
        "mounts": [{"name": "data", "host_path": "/mnt/data", "mount_path": "/data", "read_only": True},
                   {"name": "ckpt", "claim": "ckpt-pvc", "host_path": "/mnt/ckpt", "mount_path": "/ckpt"}],
        "slurm": {"partition": "p1", "account": "acct", "time": "01:00:00", "extra_directives": ["--exclusive"]},
        "kubernetes": {"namespace": "ns", "queue": "q1"},
    }
    job.update(changes)
    return job


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


def _directives(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            out[key] = value
    return out


def test_slurm_directives_and_torchrun_line() -> None:
    script = slurm_script(job_from_mapping(_job()))
    d = _directives(script)
    assert d["--nodes"] == "3" and d["--ntasks-per-node"] == "1" and d["--gpus-per-node"] == "4"
    assert (d["--partition"], d["--account"], d["--time"], d["--job-name"]) == ("p1", "acct", "01:00:00", "osp-test")
    assert "--exclusive" in d
    node_cmd = next(line for line in script.splitlines() if line.startswith("NODE_CMD="))
    cmd = shlex.split(node_cmd)[0][len("NODE_CMD="):]
    words = shlex.split(cmd.split("&&")[-1])
    assert words[:2] == ["exec", "torchrun"]  # the node's task is torchrun: a signal to the step reaches it
    assert {"--nnodes=3", "--nproc-per-node=4", "--rdzv-backend=c10d"} <= set(words)
    assert "--rdzv-endpoint=${MASTER_ADDR}:29500" in words
    tail = words[words.index("pretrain_t2v.py"):]
    assert tail == ["pretrain_t2v.py", "--model-config", "m.yaml", "--lr", "6e-5", "--save", "/ckpt/with space",
                    "--load", "/ckpt/with space", "--device", "cuda"]  # a requeued job resumes
    assert "--container-mounts=/mnt/data:/data:ro,/mnt/ckpt:/ckpt" in script  # data and checkpoints both
    assert d["--signal"] == "B:USR1@600" and "--requeue" in d
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert '--cpus-per-task="${SLURM_CPUS_ON_NODE}"' in srun  # srun does not inherit it from sbatch
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_script_runs_with_stub_scheduler(tmp_path: Path) -> None:
    """Run the generated batch script with stand-ins for scontrol, srun and torchrun: the torchrun line that
    would start on a node carries the first node as the rendezvous endpoint and the job's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'printf "gpu-a01\\ngpu-a02\\ngpu-a03\\n"')
    _stub(bin_dir, "srun", 'for last; do :; done; for node in 0 1; do SLURM_NODEID=$node bash -c "$last" || exit 1; '
                           "done")
    _stub(bin_dir, "torchrun", f'printf "%s\\n" "$@" >> {tmp_path}/torchrun.$RDZV_ID.args; echo ---- >> '
                               f'{tmp_path}/torchrun.$RDZV_ID.args')
    job = _job(workdir=str(tmp_path), slurm={"container": False}, mounts=[])
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(job_from_mapping(job)))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a[01-03]",
           "SLURM_JOB_ID": "77", "SLURM_CPUS_ON_NODE": "64"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    runs = (tmp_path / "torchrun.77.args").read_text().split("----\n")[:-1]
    assert len(runs) == 2  # one per node stub
    words = runs[0].splitlines()
    assert "--rdzv-endpoint=gpu-a01:29500" in words and "--rdzv-id=77" in words
    assert words[-5:] == ["/ckpt/with space", "--load", "/ckpt/with space", "--device", "cuda"]


def test_slurm_npu_uses_gres_and_ascend_setup() -> None:
    script = slurm_script(job_from_mapping(_job(device="npu")))
    assert _directives(script)["--gres"] == "npu:4"
    assert "ASCEND_TOOLKIT_HOME" in script and "--device npu" in script


def test_slurm_launch_script_gets_layout_env() -> None:
    script = slurm_script(job_from_mapping(_job(script="examples/opensoraplan1.5/pretrain_t2v_npu.sh", args=[],
                                                device="npu")))
    assert "NNODES=3 NODE_RANK=${SLURM_NODEID}" in script and "NPUS_PER_NODE=4" in script
    node_cmd = next(line for line in script.splitlines() if line.startswith("NODE_CMD="))
    assert "torchrun" not in node_cmd and "exec bash" in node_cmd  # the launch script execs torchrun itself


def test_pytorchjob_manifest(tmp_path: Path) -> None:
    manifest = yaml.safe_load(yaml.safe_dump(kubernetes_manifest(job_from_mapping(_job()))))
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert manifest["metadata"]["namespace"] == "ns"
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert manifest["spec"]["runPolicy"]["schedulingPolicy"] == {"queue": "q1", "minAvailable": 3}
    pod = replicas["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch" and container["image"] == "reg.example/mv:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt-pvc", "readOnly": False}} in pod["volumes"]
    assert {"name": "STAGE", "value": "video1"} in container["env"]
    # the container's command, run by bash with the operator's variables, starts node RANK's torchrun
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "torchrun", 'printf "%s\\n" "$@"')
    command = container["command"][2].replace("cd /workspace/mv", f"cd {tmp_path}")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RANK": "2", "MASTER_ADDR": "osp-test-master-0"}
    out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    words = out.stdout.splitlines()
    assert {"--nnodes=3", "--nproc-per-node=4", "--node-rank=2", "--master-addr=osp-test-master-0"} <= set(words)


def test_volcano_manifest_for_ascend() -> None:
    job = job_from_mapping(_job(device="npu", script="examples/opensoraplan1.5/pretrain_t2v_npu.sh", args=[]))
    manifest = yaml.safe_load(yaml.safe_dump(kubernetes_manifest(job)))
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    spec = manifest["spec"]
    assert spec["minAvailable"] == 3 and spec["queue"] == "q1" and spec["schedulerName"] == "volcano"
    assert set(spec["plugins"]) == {"svc", "env"}
    (task,) = spec["tasks"]
    assert task["replicas"] == 3
    container = task["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["huawei.com/Ascend910"] == 4
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MASTER_ADDR"] == "osp-test-worker-0.osp-test" and env["STAGE"] == "video1"
    assert "NODE_RANK=${VC_TASK_INDEX}" in container["command"][2]


@pytest.mark.parametrize("change, message", [
    ({"name": "Bad_Name"}, "job name"),
    ({"env": {"HF_TOKEN": "x"}}, "credential"),
    ({"env": {"TP": 2}}, "quote numbers"),
    ({"mounts": [{"name": "d", "mount_path": "/d"}]}, "give host_path"),
    ({"slurm": {"signal_seconds": 5}}, "signal_seconds"),
    ({"script": "train.txt"}, ".py entry point"),
    ({"gpus": 8}, "unknown key"),
])
def test_bad_job_is_rejected(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        job_from_mapping(_job(**change))


def test_cli_writes_and_submits_with_a_stub(tmp_path: Path, monkeypatch, capsys) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(_job()))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="kubectl.*not on PATH"):
        main([str(job_file), "--target", "kubernetes", "--out-dir", str(tmp_path / "out"), "--submit"])
    assert yaml.safe_load((tmp_path / "out" / "osp-test.yaml").read_text())["kind"] == "PyTorchJob"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", 'echo "Submitted batch job 42 from $1"')
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert main([str(job_file), "--target", "slurm", "--out-dir", str(tmp_path / "out"), "--submit"]) == 0
    assert f"Submitted batch job 42 from {tmp_path / 'out' / 'osp-test.sbatch'}" in capsys.readouterr().out


def test_example_job_descriptions_render() -> None:
    for path in sorted((REPO / "examples" / "opensoraplan1.5").glob("job_*.yaml")):
        for target in ("slurm", "kubernetes"):
            from megatron_video.launch.submit_cli import render

            name, text = render(str(path), target)
            assert text and name.startswith(yaml.safe_load(path.read_text())["name"])


def test_slurm_refuses_mounts_it_cannot_provide() -> None:
    """A claim-only mount used to be dropped with a comment: the job then wrote its checkpoints into the
    container, lost at its end."""
    claim_only = [{"name": "ckpt", "claim": "ckpt-pvc", "mount_path": "/ckpt"}]
    with pytest.raises(ValueError, match=r"mounts \['ckpt'\] are Kubernetes volume claims only"):
        slurm_script(job_from_mapping(_job(mounts=claim_only)))
    with pytest.raises(ValueError, match="need a container"):
        slurm_script(job_from_mapping(_job(image=None)))
    with pytest.raises(ValueError, match="cannot be bound"):
        slurm_script(job_from_mapping(_job(slurm={"container": False})))
    kubernetes_manifest(job_from_mapping(_job(mounts=claim_only)))  # fine on Kubernetes


def test_slurm_usr1_reaches_the_steps_and_requeues(tmp_path: Path) -> None:
    """The batch script, sent SIGUSR1 (what `--signal=B:USR1@600` does before the time limit), passes it to the
    job steps with scancel and requeues the job once srun has ended; torchrun is told to forward SIGUSR1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", f'if [ "$1" = requeue ]; then echo "requeue $2" >> {tmp_path}/calls; '
                               'else printf "n01\\n"; fi')
    _stub(bin_dir, "scancel", f'echo "scancel $*" >> {tmp_path}/calls; touch {tmp_path}/stop')
    _stub(bin_dir, "srun", f'echo "$PET_SIGNALS_TO_HANDLE $PET_SHUTDOWN_TIMEOUT" > {tmp_path}/pet; touch '
                           f'{tmp_path}/started; while [ ! -e {tmp_path}/stop ]; do sleep 0.1; done; exit 1')
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(job_from_mapping(_job(workdir=str(tmp_path), slurm={"container": False},
                                                         mounts=[]))))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n01",
           "SLURM_JOB_ID": "77", "SLURM_CPUS_ON_NODE": "8"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "calls").read_text().splitlines() == ["scancel --signal=USR1 77", "requeue 77"]
    assert (tmp_path / "pet").read_text().split() == ["SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "540"]


def test_kubernetes_jobs_resume_and_give_time_to_save() -> None:
    manifest = kubernetes_manifest(job_from_mapping(_job()))
    pod = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "--load '/ckpt/with space'" in pod["containers"][0]["command"][2]
    assert pod["terminationGracePeriodSeconds"] == 900
    assert {"name": "PET_SHUTDOWN_TIMEOUT", "value": "840"} in pod["containers"][0]["env"]


def test_volcano_pods_carry_the_ascend_ring_controller_label() -> None:
    """MindCluster's device plugin and Volcano identify Atlas pods by the pod label `ring-controller.atlas`
    (hiascend.com MindCluster documentation, "Pod labels of the cluster scheduling components")."""
    job = job_from_mapping(_job(device="npu", script="examples/opensoraplan1.5/pretrain_t2v_npu.sh", args=[]))
    manifest = kubernetes_manifest(job, "volcano")
    template = manifest["spec"]["tasks"][0]["template"]
    assert template["metadata"]["labels"] == {"ring-controller.atlas": "ascend-910b"}
    assert manifest["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910b"
