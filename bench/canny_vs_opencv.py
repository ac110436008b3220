"""The structure controller's Canny (control/signals.py) against OpenCV's `cv2.Canny(grey, 100, 200)`, pixel by
pixel, on video files. OpenCV is no dependency of this stack: install `opencv-python-headless` to run this.

    python tools/make_sample_dataset.py --out /tmp/canny_data --clip 32 32 9 8 --num-videos 40
    python bench/canny_vs_opencv.py /tmp/canny_data/videos/*.mp4

Prints the edge pixels each marks and how many pixels differ (OpenCV's grey conversion of the same RGB frames).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", nargs="+", help="video files")
    opts = parser.parse_args()
    try:
        import cv2
    except ImportError:
        print("canny_vs_opencv.py: error: needs OpenCV (pip install opencv-python-headless)", file=sys.stderr)
        return 2
    from megatron_video.control.signals import canny
    from megatron_video.sampling.video import read_mp4

    ours_total = opencv_total = differing = 0
    for path in opts.videos:
        frames = read_mp4(path)  # (T, H, W, 3) uint8 RGB
        ours = canny(torch.as_tensor(frames).permute(3, 0, 1, 2)[None].float() / 255)[0, 0].numpy() > 0
        opencv = np.stack([cv2.Canny(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), 100, 200) > 0 for f in frames])
        ours_total, opencv_total = ours_total + int(ours.sum()), opencv_total + int(opencv.sum())
        differing += int((ours != opencv).sum())
    print(f"{len(opts.videos)} videos, OpenCV {cv2.__version__}: edge pixels ours {ours_total}, OpenCV "
          f"{opencv_total}; pixels that differ {differing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
