"""Rank TP / CP / PP / DP / micro-batch / recompute layouts for one training stage on one cluster.

    python tools/tune_parallel.py --preset osp-v1.5-8.5b --shape 121x576x1024 --global-batch-size 512 \
        --cluster-preset ascend-910b-64g --devices 512

See `--help`; the model is explained in megatron_video/planning/ (memory.py, cost.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.planning.tune_cli import main  # noqa: E402
from megatron_video.tool_errors import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(main))
