"""Sliding-window segmentation (dex.downstream.windows) against direct computation and MONAI."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from dex.downstream.windows import SlidingWindow, mirrored, segment_logits, window_count


def conv_net(seed: int = 0) -> nn.Module:
    """A small network whose output depends on position within the window (not translation invariant at the
    borders), so a wrong window placement or weighting shows."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.GELU(), nn.Conv2d(8, 2, 3, padding=1)).eval()


@pytest.mark.parametrize("size", [(70, 53), (32, 32), (10, 12), (97, 200)])
@pytest.mark.parametrize("mirror", ["none", "xy"])
def test_a_network_returning_its_input_gives_the_image_back(size, mirror):
    """The Gaussian weights are normalised by their sum at every pixel, the borders and a padded image included."""
    image = torch.rand(2, 3, *size)
    out = segment_logits(lambda x: x, image, (32, 32), overlap=0.5, mirror=mirror, batch_size=3)
    assert out.shape == image.shape
    torch.testing.assert_close(out, image, rtol=0, atol=1e-6)


def test_equals_monai_sliding_window_with_the_same_settings():
    net, image = conv_net(), torch.randn(1, 3, 75, 130)
    ours = segment_logits(net, image, (32, 48), overlap=0.5, mirror="none", batch_size=4)
    with torch.no_grad():
        theirs = sliding_window_inference(image, (32, 48), 4, net, overlap=0.5, mode="gaussian")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_mirroring_is_the_mean_of_the_mirrored_images_predictions():
    """On a grid that is symmetric under flips (the image minus the window a multiple of the step), mirroring
    every window equals predicting the four mirror images whole and averaging them flipped back."""
    net, image = conv_net(1), torch.randn(1, 3, 80, 96)  # window 32, step 16: 80-32 and 96-32 are multiples of 16
    ours = segment_logits(net, image, (32, 32), overlap=0.5, mirror="xy")
    expected = 0
    for dims in [(), (3,), (2,), (2, 3)]:
        flipped = image.flip(dims) if dims else image
        out = segment_logits(net, flipped, (32, 32), overlap=0.5, mirror="none")
        expected = expected + (out.flip(dims) if dims else out)
    torch.testing.assert_close(ours, expected / 4, rtol=1e-5, atol=1e-6)
    x_only = segment_logits(net, image, (32, 32), overlap=0.5, mirror="x")
    direct = (segment_logits(net, image, (32, 32), 0.5, "none")
              + segment_logits(net, image.flip(3), (32, 32), 0.5, "none").flip(3)) / 2
    torch.testing.assert_close(x_only, direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,window,overlap", [((999, 960), (64, 64), 0.5), ((256, 256), (256, 256), 0.5),
                                                  ((100, 40), (64, 64), 0.25), ((130, 131), (32, 48), 0.5)])
def test_window_count_is_the_number_of_windows_monai_runs(size, window, overlap):
    seen = []

    def counting(x):
        seen.append(len(x))
        return x[:, :1]

    segment_logits(counting, torch.zeros(1, 1, *size), window, overlap=overlap, batch_size=7)
    assert sum(seen) == window_count(size, window, overlap)


def test_sliding_window_settings_round_trip_and_refuse_bad_values():
    window = SlidingWindow((64, 48), 0.5, "xy")
    assert SlidingWindow.from_dict(window.to_dict()) == window
    with pytest.raises(ValueError, match="mirror"):
        SlidingWindow((64, 64), 0.5, "z")
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindow((64, 64), 1.0)
    with pytest.raises(ValueError, match="unknown key"):
        SlidingWindow.from_dict({"window": [8, 8], "step": 4})
    with pytest.raises(ValueError, match="mirror must be"):
        mirrored(lambda x: x, "diagonal")
