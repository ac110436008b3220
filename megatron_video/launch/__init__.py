"""Scheduler jobs (Slurm batch scripts, Kubernetes manifests) from one job description."""
