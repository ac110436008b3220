#!/usr/bin/env python
"""Write a small real video/image data set in the Open-Sora Plan layout (for the quickstart and tests).

DIR/videos/*.mp4   moving coloured shapes at several resolutions, aspect ratios, durations and fps
DIR/images/*.png|jpg   still shapes
DIR/video_annotations.json, DIR/image_annotations.json   entries with path, cap, resolution, num_frames,
    fps, aes, motion, camera (+ cut / crop on some)
DIR/data.txt   lines `root,annotation.json` (absolute paths, as the reference expects)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from megatron_video.progress import progress  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.tool_errors import run_tool  # noqa: E402

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 80, 230), "yellow": (240, 220, 40),
           "white": (245, 245, 245), "orange": (250, 140, 20), "purple": (150, 60, 200)}
BACKGROUNDS = {"black": (10, 10, 10), "dark grey": (60, 60, 60), "navy": (15, 25, 80), "olive": (90, 100, 30)}
# (height, width): landscape, portrait, square, 4:3, 3:4 and a wide one
RESOLUTIONS = [(144, 256), (256, 144), (160, 160), (192, 256), (256, 192), (128, 320), (180, 320)]
FPS = [8, 12, 24, 30]
DIRECTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1),
              "bottom to top": (0, -1), "diagonally down and to the right": (1, 1)}


def caption(colour: str, shape: str, direction: str, background: str) -> str:
    """The one caption form of the sample data (tools/motion_agreement.py writes its prompts with it and parses it)."""
    return f"A {colour} {shape} moves {direction} across a {background} background."


def draw(h: int, w: int, bg: tuple, fg: tuple, shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    yy, xx = np.ogrid[:h, :w]
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:
        mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    img[mask] = fg
    return img


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20", "g": "12"}
        import av.video.frame as avf

        for f in frames:
            for packet in stream.encode(avf.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def make(out: Path, num_videos: int = 16, num_images: int = 6, seed: int = 0,
         clip: tuple[int, int, int, int] | None = None) -> dict[str, int]:
    """`clip` (height, width, frames, fps): every video exactly that, with no cut or crop, and every shape
    larger (radius a quarter of the short side), so that a training run at that size reads whole clips
    unresized and each caption names the one video it belongs to; None: varied sizes, durations and rates."""
    rng = np.random.default_rng(seed)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    videos, images = [], []
    for i in progress(range(num_videos), desc="sample videos", unit="video"):
        h, w = RESOLUTIONS[i % len(RESOLUTIONS)]
        fps = FPS[(i // len(RESOLUTIONS) + i) % len(FPS)]
        n = int(rng.integers(fps, 3 * fps + 1))  # 1 to 3 seconds
        fg_name, bg_name = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        shape = ["circle", "square"][i % 2]
        direction = list(DIRECTIONS)[i % len(DIRECTIONS)]
        dx, dy = DIRECTIONS[direction]
        r = min(h, w) * 0.15
        if clip is not None:
            h, w, n, fps = clip
            r = min(h, w) * 0.25
        x0, y0 = (w / 2 - dx * w * 0.35), (h / 2 - dy * h * 0.35)  # the centre crosses 70 % of the frame
        frames = [draw(h, w, BACKGROUNDS[bg_name], COLOURS[fg_name], shape,
                       x0 + dx * w * 0.7 * k / max(n - 1, 1), y0 + dy * h * 0.7 * k / max(n - 1, 1), r)
                  for k in range(n)]
        name = f"videos/clip_{i:03d}.mp4"
        write_video(out / name, frames, fps)
        speed = 0.7 * max(h, w) / n  # pixels per frame, a stand-in motion score
        cap = caption(fg_name, shape, direction, bg_name)
        caps = [cap, f"{fg_name} {shape} on {bg_name}, moving {direction}"] if i % 3 == 0 else cap
        entry = {"path": name, "cap": caps, "resolution": {"height": h, "width": w}, "num_frames": n,
                 "fps": fps,
                 "aes": round(float(rng.uniform(4.0, 7.0)), 2), "motion": round(speed, 2), "camera": "static"}
        if i % 5 == 1 and clip is None:
            entry["cut"] = [1, n - 1]
        if i % 7 == 3 and clip is None:
            entry["crop"] = [4, w - 4, 2, h - 2]
        videos.append(entry)
    for i in progress(range(num_images), desc="sample images", unit="image"):
        h, w = RESOLUTIONS[(i + 2) % len(RESOLUTIONS)] if clip is None else clip[:2]
        fg_name, bg_name = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        shape = ["square", "circle"][i % 2]
        img = draw(h, w, BACKGROUNDS[bg_name], COLOURS[fg_name], shape, w / 2, h / 2, min(h, w) * 0.25)
        name = f"images/image_{i:03d}.{'png' if i % 2 == 0 else 'jpg'}"
        from PIL import Image

        Image.fromarray(img).save(out / name)
        images.append({"path": name, "cap": f"A {fg_name} {shape} in the centre of a {bg_name} background.",
                       "resolution": {"height": h, "width": w},
                       "aes": round(float(rng.uniform(4.0, 7.0)), 2)})
    lines = []
    for entries, ann in ((videos, "video_annotations.json"), (images, "image_annotations.json")):
        if entries:
            (out / ann).write_text(json.dumps(entries, indent=1))
            lines.append(f"{out.resolve()},{(out / ann).resolve()}")
    (out / "data.txt").write_text("\n".join(lines) + "\n")
    return {"videos": len(videos), "images": len(images)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-videos", type=int, default=16)
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", type=int, nargs=4, metavar=("HEIGHT", "WIDTH", "FRAMES", "FPS"),
                   help="every video exactly this size, length and rate, with larger shapes and no cut or crop "
                        "(a data set for one training size; default: varied)")
    a = p.parse_args(argv)
    if a.num_videos < 0 or a.num_images < 0 or a.num_videos + a.num_images == 0:
        p.error("--num-videos/--num-images must be >= 0 and not both 0")
    if a.clip is not None and (min(a.clip) < 1 or a.clip[2] < 2 or a.clip[0] % 2 or a.clip[1] % 2):
        p.error("--clip needs an even height and width (H.264 in 4:2:0), a positive rate and at least 2 frames, "
                f"got {' '.join(map(str, a.clip))}")
    t0 = time.perf_counter()
    counts = make(a.out, a.num_videos, a.num_images, a.seed, tuple(a.clip) if a.clip else None)
    print(f"wrote {counts['videos']} videos and {counts['images']} images to {a.out} "
          f"in {time.perf_counter() - t0:.1f} s; metadata: {a.out / 'data.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
