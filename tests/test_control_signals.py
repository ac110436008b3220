"""Structure signals (control/signals.py): OpenCV's Canny on synthetic squares and steps (hysteresis included), and the
depth / sketch loaders with small random-weight networks saved to local paths (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_video.control.signals import canny, load_depth_estimator, load_sketch_model


def _square_video() -> torch.Tensor:
    """(1, 3, 2, 32, 32): a bright square on rows / columns 8..23 in both frames, grey in RGB."""
    video = torch.zeros(1, 3, 2, 32, 32)
    video[..., 8:24, 8:24] = 0.8
    return video


@pytest.mark.parametrize("sigma", [0.0, 1.0])  # OpenCV's default (no blur), and blurred first
def test_canny_finds_the_square_outline_one_pixel_thin(sigma: float):
    edges = canny(_square_video(), sigma=sigma)[0, 0, 0]
    assert edges.shape == (32, 32) and set(edges.unique().tolist()) <= {0.0, 1.0}
    ys, xs = torch.nonzero(edges, as_tuple=True)
    # every edge pixel lies on the boundary (between pixel 7/8 and 23/24) within one pixel
    near = lambda v: ((v - 7.5).abs() <= 1) | ((v - 23.5).abs() <= 1)  # noqa: E731
    inside = lambda v: (v >= 6) & (v <= 25)  # noqa: E731
    assert bool((((near(ys) & inside(xs)) | (near(xs) & inside(ys)))).all())
    for row in range(10, 22):  # each side closed and thin: exactly one edge pixel per row near x = 7.5
        left = edges[row, 5:11].nonzero().flatten()
        right = edges[row, 21:27].nonzero().flatten()
        assert len(left) == 1 and len(right) == 1, (row, left, right)
        assert len(edges[5:11, row].nonzero()) == 1 and len(edges[21:27, row].nonzero()) == 1
    assert edges[12:20, 12:20].sum() == 0 and edges[:4].sum() == 0


def test_canny_thresholds_drop_faint_edges():
    faint = _square_video() * 0.1  # a step of 20 levels: |Sobel| 80 on the sides, 120 at corners, under 200
    assert canny(faint).sum() == 0
    assert canny(faint, low=40, high=100).sum() > 0
    with pytest.raises(ValueError, match="low <= high"):
        canny(faint, low=300, high=100)


@pytest.mark.parametrize(("step", "edges"), [(50, False), (51, True)])
def test_canny_defaults_cut_where_opencv_canny_100_200_cuts(step: int, edges: bool):
    """cv2.Canny(grey, 100, 200) on a sharp vertical step of d levels: both sides have |Sobel| = 4 d, an edge only
    above 200 (strict, as OpenCV compares), so 51 levels make one and 50 do not; the edge is one pixel wide, on the
    step's first side (OpenCV's tie-breaking). Exact: the integer gradients of 8-bit frames are exact in float."""
    video = torch.full((1, 1, 1, 16, 16), 60 / 255)
    video[..., 8:] = (60 + step) / 255
    found = canny(video)[0, 0, 0]
    if not edges:
        assert found.sum() == 0
        return
    assert found[:, 7].all() and found.sum() == 16  # the column before the step, every row


def test_canny_keeps_weak_edges_connected_to_strong_ones():
    """Hysteresis: a vertical step of 60 levels (|Sobel| 240, above 200) in the top half continues as a step of 30
    levels (120: between 100 and 200) in the bottom half: the weak part is kept, as it connects to the strong one;
    the same weak step alone makes no edge."""
    video = torch.full((1, 1, 1, 32, 32), 60 / 255)
    video[..., :16, 16:] = 120 / 255
    video[..., 16:, 16:] = 90 / 255
    found = canny(video)[0, 0, 0]
    assert found[:15, 15].all() and found[17:, 15].all()  # the column before the step, the weak half included
    # (around the corner at rows 15-16 the edge steps one column over, still 8-connected)
    weak_only = torch.full((1, 1, 1, 32, 32), 60 / 255)
    weak_only[..., 16:] = 90 / 255
    assert canny(weak_only).sum() == 0


def tiny_dpt(path: Path) -> Path:
    """A random-weight DPT (the MiDaS v3 architecture in transformers), saved as a local directory."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=8, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3], head_in_index=-1)
    torch.manual_seed(0)
    DPTForDepthEstimation(config).save_pretrained(path)
    return path


def test_depth_estimator_from_a_local_dpt_directory(tmp_path):
    """A tiny random-weight DPT saved and read back locally."""
    depth = load_depth_estimator(tiny_dpt(tmp_path / "dpt"), input_size=(32, 32))
    out = depth(_square_video()[..., :24, :16])
    assert out.shape == (1, 1, 2, 24, 16)
    assert out.min() >= 0 and out.max() <= 1  # per-frame scaled to [0, 1]
    assert torch.equal(out.amax(dim=(0, 1, 3, 4)), torch.ones(2)) and torch.equal(out.amin(dim=(0, 1, 3, 4)),
                                                                                 torch.zeros(2))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_depth_estimator(tmp_path / "missing")


class _TinySketch(torch.nn.Module):
    """Stand-in with PiDiNet's contract: normalised RGB -> sigmoid edge map at half resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


def test_sketch_model_from_a_local_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = _TinySketch()
    save_file(net.state_dict(), tmp_path / "sketch.safetensors")
    sketch = load_sketch_model(tmp_path / "sketch.safetensors", _TinySketch)
    video = torch.rand(2, 3, 3, 16, 12)
    out = sketch(video)
    assert out.shape == (2, 1, 3, 16, 12) and out.min() >= 0 and out.max() <= 1
    frame = video[1, :, 2][None]  # the loaded weights are the saved ones: same map as the original network
    expected = torch.nn.functional.interpolate(net((frame - 0.5) / 0.5), size=(16, 12), mode="bilinear")
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    torch.testing.assert_close(out[1, :, 2], expected[0])
    save_file({"conv.weight": net.conv.weight}, tmp_path / "partial.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_sketch_model(tmp_path / "partial.safetensors", _TinySketch)
