"""Qwen2-VL / Qwen2.5-VL's input frame as a vlzoo image transform.

:class:`SmartResizeTransform` resizes every image to its own :func:`~vlzoo.data.frames.smart_resize`
size (aspect ratio kept, both sides multiples of ``factor`` = patch x merge, the pixel count
within ``min_pixels`` .. ``max_pixels``), normalises it and records the map as an
:class:`~vlzoo.structures.ImageTransform`, so predictions in the network input's pixels (the
``qwen2.5vl`` codec's absolute pixels, the ``qwen2vl`` codec's 0..1000 of the same image) map
back to original pixels exactly as the model's processor frames them.

A Qwen backbone declares it in its ``data_config["transform"]``; ``vlzoo.build`` hands it to the
datamodule (``image_transform``).  The geometry is exactly the processor's (``smart_resize`` is
checked against transformers'); pixel values are resampled with PyTorch's antialiased bicubic
interpolation, close to (not bit-equal with) the processor's own resize.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlzoo.data.frames import QWEN_FACTOR, QWEN_MIN_PIXELS, QWEN_RELEASED_MAX_PIXELS, smart_resize
from vlzoo.data.transforms import ResizeTransform
from vlzoo.structures import ImageTransform

__all__ = ["SmartResizeTransform", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

#: Qwen2-VL / Qwen2.5-VL's image processors normalise with OpenAI CLIP's statistics
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SmartResizeTransform(ResizeTransform):
    """Resize each image to its ``smart_resize`` size and normalise it (see the module doc).

    Args:
        min_pixels, max_pixels: the processor's pixel limits (``size.shortest_edge`` /
            ``size.longest_edge`` of its ``preprocessor_config.json``).
        factor: patch size x spatial merge size (28 for the released models).
        mean, std: per-channel normalisation in ``[0, 1]`` units.
    """

    def __init__(
        self,
        *,
        min_pixels: int = QWEN_MIN_PIXELS,
        max_pixels: int = QWEN_RELEASED_MAX_PIXELS,
        factor: int = QWEN_FACTOR,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        if not 1 <= int(min_pixels) <= int(max_pixels) or int(factor) < 1:
            raise ValueError(
                f"SmartResizeTransform: need 1 <= min_pixels <= max_pixels and factor >= 1, got min_pixels={min_pixels}, "
                f"max_pixels={max_pixels}, factor={factor}"
            )
        super().__init__(size=factor, mode="resize", mean=mean, std=std)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.factor = int(factor)

    def geometry(self, original_size: tuple[int, int]) -> ImageTransform:
        h, w = (int(v) for v in original_size)
        nh, nw = smart_resize(h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return ImageTransform((h, w), (nh, nw), scale=(nw / w, nh / h), offset=(0.0, 0.0))

    def image(self, image: Tensor) -> tuple[Tensor, ImageTransform]:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        geo = self.geometry((h, w))
        x = image.float().div_(255.0)
        if tuple(x.shape[-2:]) != tuple(geo.input_size):
            x = F.interpolate(x[None], size=geo.input_size, mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return (x - mean) / std, geo

    def __repr__(self) -> str:
        return (
            f"SmartResizeTransform(min_pixels={self.min_pixels}, max_pixels={self.max_pixels}, factor={self.factor})"
        )
