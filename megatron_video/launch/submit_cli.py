"""Command line of `tools/submit.py`: write (and with --submit, submit) a Slurm or Kubernetes job."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from megatron_video.configfile import ConfigError
from megatron_video.launch.job import load_job
from megatron_video.launch.kubernetes import kubernetes_manifest
from megatron_video.launch.slurm import slurm_script


class SubmitError(RuntimeError):
    """The scheduler's command is missing or refused the job."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("job", help="job description (YAML/JSON); see megatron_video/launch/job.py")
    p.add_argument("--target", choices=("slurm", "kubernetes"), required=True)
    p.add_argument("--kind", choices=("pytorchjob", "volcano"), default=None,
                   help="Kubernetes job kind (default: pytorchjob for gpu, volcano for npu)")
    p.add_argument("--out-dir", default=".", help="where the generated file is written")
    p.add_argument("--submit", action="store_true", help="also run sbatch / kubectl apply -f on it")
    return p


def render(job_path: str, target: str, kind: str | None = None) -> tuple[str, str]:
    """(file name, text) of the generated batch script or manifest."""
    job = load_job(job_path)
    if target == "slurm":
        return f"{job.name}.sbatch", slurm_script(job)
    manifest = kubernetes_manifest(job, kind)
    return f"{job.name}.yaml", yaml.safe_dump(manifest, sort_keys=False, width=1000)


def submit_command(target: str, path: Path) -> list[str]:
    return ["sbatch", str(path)] if target == "slurm" else ["kubectl", "apply", "-f", str(path)]


def submit(target: str, path: Path) -> str:
    cmd = submit_command(target, path)
    if shutil.which(cmd[0]) is None:
        raise SubmitError(f"`{cmd[0]}` is not on PATH; the file is written at {path}; submit it from a machine "
                          f"with the {'Slurm client' if target == 'slurm' else 'kubectl'} installed")
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SubmitError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        name, text = render(args.job, args.target, args.kind)
    except (ConfigError, ValueError) as exc:
        raise SystemExit(f"submit: {exc}") from exc
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(text)
    print(f"wrote {path}")
    if args.submit:
        try:
            print(submit(args.target, path))
        except SubmitError as exc:
            raise SystemExit(f"submit: {exc}") from exc
    return 0


__all__ = ["SubmitError", "build_parser", "main", "render", "submit", "submit_command"]
