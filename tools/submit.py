"""Write a Slurm batch script or a Kubernetes job (PyTorchJob / Volcano) from one job description.

    python tools/submit.py job.yaml --target slurm --out-dir jobs/ [--submit]
    python tools/submit.py job.yaml --target kubernetes [--kind volcano] [--submit]

The job description is documented in megatron_video/launch/job.py; an example is
examples/opensoraplan1.5/job_video1_npu.yaml.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.launch.submit_cli import main  # noqa: E402
from megatron_video.tool_errors import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(main))
