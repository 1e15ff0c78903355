"""Geometric and photometric transforms from original image to network input.

:class:`ResizeTransform` maps an image and its :class:`~vlzoo.structures.Targets` together and
records the map as an :class:`~vlzoo.structures.ImageTransform` (``input = original * scale +
offset``), whose inverse methods bring predictions back to original pixels.

Two modes:

* ``"pad_square"`` - LLaVA/Shikra ``expand2square``: pad the shorter side symmetrically with the
  mean colour to a square, then resize (aspect ratio kept);
* ``"resize"`` - resize straight to the input size (aspect ratio changes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlzoo.structures import ImageTransform, Targets

__all__ = ["ResizeTransform", "RESIZE_MODES", "IMAGENET_MEAN", "IMAGENET_STD"]

RESIZE_MODES = ("pad_square", "resize")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


class ResizeTransform:
    """Resize (optionally pad to square first) and normalise an image with its targets.

    Args:
        size: network input size, an int (square) or ``(H, W)``.
        mode: ``"pad_square"`` or ``"resize"``.
        mean, std: per-channel normalisation in ``[0, 1]`` units; also the padding colour.
    """

    def __init__(
        self,
        *,
        size: int | Sequence[int] = 224,
        mode: str = "pad_square",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if mode not in RESIZE_MODES:
            raise ValueError(f"ResizeTransform: mode must be one of {RESIZE_MODES}, got {mode!r}")
        self.size = _size_pair(size)
        self.mode = mode
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def geometry(self, original_size: tuple[int, int]) -> ImageTransform:
        """The map for an image of ``original_size`` ``(H, W)``."""
        h, w = original_size
        oh, ow = self.size
        if self.mode == "resize":
            return ImageTransform((h, w), (oh, ow), scale=(ow / w, oh / h), offset=(0.0, 0.0))
        side = max(h, w)
        pad_x, pad_y = (side - w) // 2, (side - h) // 2
        sx, sy = ow / side, oh / side
        return ImageTransform((h, w), (oh, ow), scale=(sx, sy), offset=(pad_x * sx, pad_y * sy))

    def image(self, image: Tensor) -> tuple[Tensor, ImageTransform]:
        """``(3, H, W)`` uint8 -> normalised ``(3, oh, ow)`` float and the map."""
        h, w = int(image.shape[-2]), int(image.shape[-1])
        geo = self.geometry((h, w))
        x = image.float().div_(255.0)
        if self.mode == "pad_square" and h != w:
            side = max(h, w)
            pad_x, pad_y = (side - w) // 2, (side - h) // 2
            canvas = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1).expand(3, side, side).clone()
            canvas[:, pad_y : pad_y + h, pad_x : pad_x + w] = x
            x = canvas
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return (x - mean) / std, geo

    def masks(self, masks: Tensor, geo: ImageTransform) -> Tensor:
        """``(N, H, W)`` bool at original size -> ``(N, oh, ow)`` bool at input size."""
        n = masks.shape[0]
        oh, ow = geo.input_size
        if n == 0:
            return torch.zeros((0, oh, ow), dtype=torch.bool)
        h, w = geo.original_size
        m = masks.bool()
        if self.mode == "pad_square" and h != w:
            side = max(h, w)
            pad_x, pad_y = (side - w) // 2, (side - h) // 2
            canvas = torch.zeros((n, side, side), dtype=torch.bool)
            canvas[:, pad_y : pad_y + h, pad_x : pad_x + w] = m
            m = canvas
        if tuple(m.shape[-2:]) == (oh, ow):
            return m
        # "nearest-exact" samples pixel centres, consistent with the continuous affine map
        return F.interpolate(m[:, None].float(), size=(oh, ow), mode="nearest-exact")[:, 0] > 0.5

    def targets(self, targets: Targets, geo: ImageTransform) -> Targets:
        """Targets in original pixels -> targets in input pixels (boxes, masks, keypoints)."""
        changes: dict = {"boxes": geo.boxes_to_input(targets.boxes), "image_size": geo.input_size}
        if targets.masks is not None:
            changes["masks"] = self.masks(targets.masks, geo)
        if targets.keypoints is not None:
            changes["keypoints"] = geo.points_to_input(targets.keypoints)
        if targets.areas is not None:
            changes["areas"] = targets.areas.float() * (geo.scale[0] * geo.scale[1])
        return targets.replace(**changes)

    def __call__(self, image: Tensor, targets: Targets) -> tuple[Tensor, Targets, ImageTransform]:
        """Transform an image and its targets together."""
        x, geo = self.image(image)
        return x, self.targets(targets, geo), geo
