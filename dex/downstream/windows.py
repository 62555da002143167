"""Segmentation of images of any size by a network of a fixed input size: MONAI's sliding window with Gaussian
weighting (:func:`monai.inferers.sliding_window_inference`, as nnU-Net predicts) and test-time mirroring.

The windows overlap by ``overlap`` (0.5 as in nnU-Net) and each window's output is weighted by a Gaussian centred on
it (sigma 1/8 of the window, MONAI's and nnU-Net's), so that a pixel's logits are the weighted mean of every window
that sees it, the windows' centres counting most; the weights are normalised by their sum, so a network that returns
its input gives the image back. An image smaller than the window is padded with zeros (the mean of a z-scored
input) and cropped back. With ``mirror``, each window is also predicted mirrored along each of the axes named and
along both together (nnU-Net's test-time mirroring, every combination of the axes) and the logits averaged,
mirrored back. Logits are averaged, not probabilities (nnU-Net's rule); the softmax comes after.

Fine-tuning's validation and test, ``dex predict`` and ``dex benchmark`` all segment through :func:`segment_logits`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

Mirror = Literal["none", "x", "xy"]
MIRRORS: tuple[str, ...] = ("none", "x", "xy")
#: the tensor axes of [B, C, H, W] each mirror setting flips: x is the width (left-right), y the height
MIRROR_AXES: dict[str, tuple[int, ...]] = {"none": (), "x": (3,), "xy": (2, 3)}


def mirrored(network: Callable[[Tensor], Tensor], mirror: Mirror) -> Callable[[Tensor], Tensor]:
    """``network`` averaged over the mirror images of its input: for ``xy``, the input as is, flipped left-right,
    flipped up-down and both (each output flipped back); ``none`` gives ``network`` itself."""
    if mirror not in MIRROR_AXES:
        raise ValueError(f"mirror must be one of {', '.join(MIRRORS)}, got {mirror!r}")
    axes = MIRROR_AXES[mirror]
    if not axes:
        return network
    flips = [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]

    def predictor(x: Tensor) -> Tensor:
        total = network(x)
        for dims in flips[1:]:
            total = total + network(x.flip(dims)).flip(dims)
        return total / len(flips)

    return predictor


@torch.no_grad()
def segment_logits(network: Callable[[Tensor], Tensor] | nn.Module, images: Tensor, window: Sequence[int],
                   overlap: float = 0.5, mirror: Mirror = "none", batch_size: int = 8) -> Tensor:
    """Logits [B, K, H, W] of model inputs ``images`` [B, C, H, W] (any H, W) from ``network`` taking
    [N, C, h, w] windows of size ``window`` (h, w) to [N, K, h, w] logits: Gaussian-weighted sliding windows at
    ``overlap``, ``batch_size`` windows a forward, each window mirrored as ``mirror`` says (see the module)."""
    from monai.inferers import sliding_window_inference  # deferred: MONAI is slow to import

    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    window = tuple(int(v) for v in window)
    logits = sliding_window_inference(images, window, batch_size, mirrored(network, mirror), overlap=overlap,
                                      mode="gaussian", padding_mode="constant", cval=0.0)
    return torch.as_tensor(logits)


def window_count(size: Sequence[int], window: Sequence[int], overlap: float = 0.5) -> int:
    """How many windows :func:`segment_logits` runs over an image of ``size`` (h, w): MONAI's scan, a step of
    ``window * (1 - overlap)`` along each axis (at least 1), the last window flush with the border."""
    count = 1
    for length, side in zip(size, window):
        length = max(int(length), int(side))
        step = max(int(int(side) * (1 - overlap)), 1)
        count *= -(-(length - int(side)) // step) + 1
    return count


@dataclass(frozen=True)
class SlidingWindow:
    """How a segmentation model is run over an image: windows of ``window`` (h, w), ``overlap``, ``mirror``;
    recorded as the ``inference`` block of a model folder's ``config.json``."""

    window: tuple[int, int]
    overlap: float = 0.5
    mirror: Mirror = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", tuple(int(v) for v in self.window))
        if len(self.window) != 2 or min(self.window) < 1:
            raise ValueError(f"inference: window: expected [height, width] in pixels, got {list(self.window)}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"inference: overlap: expected a value in [0, 1), got {self.overlap}")
        if self.mirror not in MIRRORS:
            raise ValueError(f"inference: mirror: expected one of {', '.join(MIRRORS)}, got {self.mirror!r}")

    def __call__(self, network: Callable[[Tensor], Tensor] | nn.Module, images: Tensor, batch_size: int = 8
                 ) -> Tensor:
        """:func:`segment_logits` of ``images`` [B, C, H, W] with these settings: [B, K, H, W] logits."""
        return segment_logits(network, images, self.window, self.overlap, self.mirror, batch_size)

    def to_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "overlap": self.overlap, "mirror": self.mirror}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlidingWindow:
        unknown = set(data) - {"window", "overlap", "mirror"}
        if unknown:
            raise ValueError(f"inference: unknown key(s) {', '.join(sorted(unknown))} (known: mirror, overlap, "
                             "window)")
        return cls(**data)
