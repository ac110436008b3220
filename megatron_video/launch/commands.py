"""The per-node command of a job: torchrun for a .py entry point, or one of our launch scripts for a .sh.

Rendezvous: `c10d` (Slurm: every node contacts the first node's store, which that node hosts because the
endpoint is its own host name) or `static` (Kubernetes: node rank from the pod index, rank 0 hosts the store,
so no host-name matching is needed). Values such as `$SLURM_NODEID` stay unexpanded: they are read on each
node.

A scheduler's retry must resume, not start over: a job that saves (`--save D`) also loads from there
(`--load D`; the first run finds no checkpoint and starts from scratch). The node's shell `exec`s torchrun, so
a signal to the job step reaches torchrun, which forwards it to the trainers (nothing in between dies of it).
"""

from __future__ import annotations

import shlex

from megatron_video.launch.job import JobSpec

# CANN's environment, when the image does not set it up itself (our .sh launch scripts do it themselves)
ASCEND_SETUP = '{ [ -z "${ASCEND_TOOLKIT_HOME:-}" ] || source "${ASCEND_TOOLKIT_HOME}/set_env.sh"; }'


def _q(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def torchrun_words(job: JobSpec, rendezvous: str, node_rank: str, master_addr: str) -> list[str]:
    """torchrun's words with shell variables left for the node to expand (not quoted)."""
    words = ["torchrun", f"--nnodes={job.nodes}", f"--nproc-per-node={job.devices_per_node}"]
    if rendezvous == "c10d":
        words += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{job.master_port}",
                  "--rdzv-id=${RDZV_ID}"]
    elif rendezvous == "static":
        words += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={job.master_port}"]
    else:
        raise ValueError(f"rendezvous must be 'c10d' or 'static', got {rendezvous!r}")
    return words


def resuming_args(args: list[str]) -> list[str]:
    """`args` with `--load` = `--save` added when the job saves and names no `--load` of its own."""
    save = None
    for i, word in enumerate(args):
        if word == "--save" and i + 1 < len(args):
            save = args[i + 1]
        elif word.startswith("--save="):
            save = word.split("=", 1)[1]
    if save is None or any(w == "--load" or w.startswith("--load=") for w in args):
        return list(args)
    return [*args, "--load", save]


def node_command(job: JobSpec, rendezvous: str, node_rank: str, master_addr: str) -> str:
    """One shell command line run once per node."""
    parts = []
    if job.workdir:
        parts.append(f"cd {shlex.quote(job.workdir)}")
    if job.script.endswith(".py"):
        if job.device == "npu":
            parts.append(ASCEND_SETUP)
        device = "npu" if job.device == "npu" else "cuda"
        launch = " ".join(torchrun_words(job, rendezvous, node_rank, master_addr))
        extra = [] if "--device" in job.args else ["--device", device]
        parts.append(f"exec {launch} {_q([job.script, *resuming_args(job.args), *extra])}")
    else:  # our launch scripts read the layout from the environment and call torchrun themselves
        per_node = "NPUS_PER_NODE" if job.device == "npu" else "GPUS_PER_NODE"
        parts.append(f"NNODES={job.nodes} NODE_RANK={node_rank} MASTER_ADDR={master_addr} "
                     f"MASTER_PORT={job.master_port} {per_node}={job.devices_per_node} "
                     f"exec bash {_q([job.script, *job.args])}")  # LOAD_DIR defaults to SAVE_DIR there
    return " && ".join(parts)


__all__ = ["ASCEND_SETUP", "node_command", "resuming_args", "torchrun_words"]
