"""Sliding-window inference: positions, MONAI agreement, padding, streaming, empty windows."""
import numpy as np
import pytest
import torch

from VeloxSegLib.infer.sliding_window import (count_windows, importance_map, sliding_window, stream_windows,
                                              window_starts)


def _net(in_ch=2, classes=3, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(in_ch, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, classes, 3, padding=1))
    return net.eval()


def test_window_starts_cover_the_axis_and_end_flush():
    assert window_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]
    assert window_starts(32, 32, 0.5) == [0]
    assert window_starts(70, 32, 0.25) == [0, 24, 38]


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_uniform_blending_agrees_with_monai(overlap):
    monai_inferers = pytest.importorskip("monai.inferers")
    net = _net()
    x = torch.randn(1, 2, 45, 38, 51)  # divisible by the patch on no axis
    roi = (16, 16, 16)
    with torch.inference_mode():
        ours = sliding_window(x, roi, net, overlap=overlap, blending="uniform", batch_size=3)
        ref = monai_inferers.sliding_window_inference(x, roi, 3, net, overlap=overlap, mode="constant")
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_volume_smaller_than_window_is_padded_like_monai():
    monai_inferers = pytest.importorskip("monai.inferers")
    net = _net()
    x = torch.randn(1, 2, 10, 20, 13)
    with torch.inference_mode():
        ours = sliding_window(x, (16, 16, 16), net, overlap=0.25)
        ref = monai_inferers.sliding_window_inference(x, (16, 16, 16), 1, net, overlap=0.25, mode="constant")
    assert ours.shape == (1, 3, 10, 20, 13)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_gaussian_blending_of_a_constant_predictor_is_that_constant():
    x = torch.zeros(1, 1, 40, 33, 27)
    const = lambda b: torch.full((b.shape[0], 2) + tuple(b.shape[2:]), 3.0)  # noqa: E731
    out = sliding_window(x, (16, 16, 16), const, overlap=0.5, blending="gaussian")
    assert torch.allclose(out, torch.full_like(out, 3.0), atol=1e-5)
    w = importance_map((16, 16, 16), "gaussian")
    assert float(w.max()) == pytest.approx(1.0) and float(w.min()) > 0


def test_streaming_buffers_are_only_one_patch_deep():
    x = torch.randn(1, 70, 20, 20)
    seen = []
    for z0, z1, acc, w in stream_windows(x, (16, 16, 16), lambda b: b.repeat(1, 2, 1, 1, 1), overlap=0.25):
        assert acc.shape[1] == z1 - z0 <= 16
        seen.append((z0, z1))
    # slabs tile 0..70 without gaps or overlaps
    assert seen[0][0] == 0 and seen[-1][1] == 70
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:]))


def test_windows_without_body_voxels_are_not_run():
    x = torch.randn(1, 64, 64, 64)
    body = np.zeros((64, 64, 64), dtype=bool)
    body[5:10, 5:10, 5:10] = True  # only the corner window holds body
    calls = []

    def pred(b):
        calls.append(b.shape[0])
        return torch.ones((b.shape[0], 2) + tuple(b.shape[2:]))

    weights = np.zeros((64, 64, 64), dtype=np.float32)
    for z0, z1, acc, w in stream_windows(x, (32, 32, 32), pred, overlap=0.0, body=body):
        weights[z0:z1] = w.numpy()
    assert sum(calls) == 1 == count_windows((64, 64, 64), (32, 32, 32), 0.0, body)[0]
    assert weights[:32, :32, :32].min() == 1 and weights[32:].max() == 0


def test_cancel_stops_between_windows():
    from VeloxSegLib.errors import Cancelled

    x = torch.randn(1, 64, 64, 64)
    n = []

    def pred(b):
        n.append(1)
        return torch.zeros((b.shape[0], 2) + tuple(b.shape[2:]))

    with pytest.raises(Cancelled):
        for _ in stream_windows(x, (32, 32, 32), pred, overlap=0.0, cancel=lambda: len(n) >= 2):
            pass
    assert len(n) == 2
