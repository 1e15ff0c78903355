"""Coordinate frames: what the numbers in a model's answer mean, and how to bring them back to
the pixels of the original image.

A model never answers in the original image's pixels: it answers in the frame of the image its
processor made, and often normalised.  Reading an answer in the wrong frame is the usual reason a
published model scores far below its paper.  A :class:`Frame` names one convention and maps boxes
both ways, given the original image size ``(H, W)``:

=============================  ==================================================================
frame                          a coordinate is
=============================  ==================================================================
``original``                   absolute pixels of the original image
``pad_to_square``              absolute pixels of vlzoo's own input frame: the image padded
                               symmetrically to a square (LLaVA / Shikra ``expand2square``, as
                               :class:`~vlzoo.data.transforms.ResizeTransform` ``mode="pad_square"``
                               does), then resized to ``size`` (default: the padded side, i.e.
                               no resize)
``smart_resize``               absolute pixels of Qwen2-VL / Qwen2.5-VL's resized input
                               (:func:`smart_resize` with ``min_pixels`` / ``max_pixels`` /
                               ``factor``; aspect ratio kept up to multiples of ``factor``)
``normalized_1``               0..1 of the original image
``normalized_1000``            0..1000 of the original image (Qwen2-VL's integers)
``normalized_1@pad_to_square`` 0..1 of the padded square (Shikra); also ``normalized_1000@...``
=============================  ==================================================================

The frames whose image is the original one up to a per-axis scale (``original``,
``smart_resize``, the normalised ones) agree on anything *normalised*: a ``<loc_k>`` bin or a
0..1000 integer is the same point in all of them.  They differ on absolute numbers.  Token
answers (bins, patch indices) are therefore read relative to the frame's *reference image*
(:meth:`Frame.reference_size`), plain numbers in the frame's own units (:meth:`Frame.to_original`).

This module is geometry only (no codecs, no paradigms); ``vlzoo score`` (:mod:`vlzoo.scoring`)
and docs/evaluation.md ("Coordinate frames") build on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vlzoo.data.transforms import ResizeTransform
from vlzoo.structures import ImageTransform

__all__ = [
    "Frame",
    "OriginalFrame",
    "PadToSquareFrame",
    "SmartResizeFrame",
    "NormalizedFrame",
    "FRAMES",
    "FAMILY_FRAMES",
    "QWEN_FACTOR",
    "QWEN_MIN_PIXELS",
    "QWEN_MAX_PIXELS",
    "QWEN_RELEASED_MAX_PIXELS",
    "make_frame",
    "smart_resize",
]

#: Qwen2-VL / Qwen2.5-VL: patch 14 x spatial merge 2 - both sides become multiples of 28
QWEN_FACTOR = 28
#: the defaults of the published ``smart_resize`` (56 * 56 and 28 * 28 * 1280 pixels)
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
#: ``max_pixels`` of the released Qwen2-VL / Qwen2.5-VL ``preprocessor_config.json`` (16384 * 28 * 28);
#: what ``vlzoo score --frame smart_resize`` uses unless told otherwise
QWEN_RELEASED_MAX_PIXELS = 16384 * 28 * 28
#: the largest long-to-short side ratio Qwen's resize accepts
QWEN_MAX_ASPECT = 200


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = QWEN_FACTOR,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """The ``(height, width)`` Qwen2-VL / Qwen2.5-VL resize an image of that size to.

    The documented algorithm: round each side to the nearest multiple of ``factor`` (Python's
    ``round``, halves to even); if that has more than ``max_pixels`` pixels, scale both sides by
    ``sqrt(H * W / max_pixels)`` and round *down* to multiples of ``factor`` (at least one
    ``factor``); if fewer than ``min_pixels``, scale up by ``sqrt(min_pixels / (H * W))`` and
    round *up*.  The aspect ratio is kept as closely as multiples of ``factor`` allow.

    Raises ``ValueError`` for a non-positive size, a long-to-short ratio above 200 (as the
    reference does), a ``factor`` below 1 or ``min_pixels > max_pixels``.
    ``tests/data/test_frames.py`` checks it against transformers' ``smart_resize`` on thousands of
    random sizes and limits.
    """
    h, w = int(height), int(width)
    if h <= 0 or w <= 0:
        raise ValueError(f"smart_resize: height and width must be positive, got {height} x {width}")
    if factor < 1:
        raise ValueError(f"smart_resize: factor must be >= 1, got {factor}")
    if min_pixels > max_pixels:
        raise ValueError(f"smart_resize: min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    if max(h, w) / min(h, w) > QWEN_MAX_ASPECT:
        raise ValueError(
            f"smart_resize: aspect ratio {max(h, w) / min(h, w):g} of a {w} x {h} image is above {QWEN_MAX_ASPECT}, "
            "which Qwen2-VL's resize refuses"
        )
    new_h = factor * round(h / factor)
    new_w = factor * round(w / factor)
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(h * w / max_pixels)
        new_h = max(factor, factor * math.floor(h / shrink / factor))
        new_w = max(factor, factor * math.floor(w / shrink / factor))
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (h * w))
        new_h = factor * math.ceil(h * grow / factor)
        new_w = factor * math.ceil(w * grow / factor)
    return new_h, new_w


def _size(original_size: Sequence[int]) -> tuple[int, int]:
    h, w = (int(v) for v in original_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"a frame needs a positive original image size (H, W), got {tuple(original_size)}")
    return h, w


def _as_boxes(boxes: Tensor | Sequence[Sequence[float]]) -> Tensor:
    return torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)


class Frame:
    """A coordinate convention: a reference image made from the original (an
    :class:`~vlzoo.structures.ImageTransform`) and the units coordinates are written in.

    Subclasses define :attr:`name` and :meth:`transform`; :class:`NormalizedFrame` also changes
    the units.  Boxes are ``(N, 4)`` ``xyxy``; sizes ``(H, W)``.
    """

    name: str = "frame"

    def transform(self, original_size: Sequence[int]) -> ImageTransform:
        """Original image -> the frame's reference image (in pixels)."""
        raise TypeError(f"{type(self).__name__} does not define transform")

    def reference_size(self, original_size: Sequence[int]) -> tuple[int, int]:
        """``(H, W)`` of the reference image: what bins and patch indices are fractions of."""
        return tuple(self.transform(original_size).input_size)  # type: ignore[return-value]

    def units(self, original_size: Sequence[int]) -> tuple[float, float]:
        """``(H, W)`` extent of the frame's coordinates (the reference size for pixel frames)."""
        h, w = self.reference_size(original_size)
        return float(h), float(w)

    # --- frame coordinates <-> original pixels ---------------------------------------------------
    def to_original(self, boxes: Tensor | Sequence[Sequence[float]], original_size: Sequence[int]) -> Tensor:
        """Boxes written in this frame -> original pixels (float32, clamped to the image)."""
        b = self._units_to_reference(_as_boxes(boxes), original_size)
        return self.transform(_size(original_size)).boxes_to_original(b.float())

    def from_original(self, boxes: Tensor | Sequence[Sequence[float]], original_size: Sequence[int]) -> Tensor:
        """Original pixels -> boxes in this frame's units (float64, not rounded)."""
        geo = self.transform(_size(original_size))
        b = _as_boxes(boxes)
        sx, sy = geo.scale
        ox, oy = geo.offset
        out = b.clone()
        out[:, 0::2] = b[:, 0::2] * sx + ox
        out[:, 1::2] = b[:, 1::2] * sy + oy
        return self._reference_to_units(out, original_size)

    def fractions_to_original(self, boxes: Tensor | Sequence[Sequence[float]], original_size: Sequence[int]) -> Tensor:
        """Boxes as fractions (0..1) of the reference image -> original pixels (how a token
        answer, a bin or a patch index, is read in this frame)."""
        h, w = self.reference_size(original_size)
        b = _as_boxes(boxes) * torch.tensor([w, h, w, h], dtype=torch.float64)
        return self.transform(_size(original_size)).boxes_to_original(b.float())

    def _units_to_reference(self, boxes: Tensor, original_size: Sequence[int]) -> Tensor:
        return boxes

    def _reference_to_units(self, boxes: Tensor, original_size: Sequence[int]) -> Tensor:
        return boxes

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True, repr=False)
class OriginalFrame(Frame):
    """Absolute pixels of the original image."""

    name = "original"

    def transform(self, original_size: Sequence[int]) -> ImageTransform:
        h, w = _size(original_size)
        return ImageTransform((h, w), (h, w), scale=(1.0, 1.0), offset=(0.0, 0.0))


@dataclass(frozen=True, repr=False)
class PadToSquareFrame(Frame):
    """Absolute pixels of vlzoo's ``pad_square`` input: padded symmetrically to a square of side
    ``max(H, W)``, then resized to ``size`` (``None``: not resized) - the map
    :class:`~vlzoo.data.transforms.ResizeTransform` records, so a vlzoo model's own answers map
    back exactly as its predictions do."""

    size: int | None = None
    name = "pad_to_square"

    def __post_init__(self) -> None:
        if self.size is not None and int(self.size) < 1:
            raise ValueError(f"PadToSquareFrame: size must be a positive side in pixels, got {self.size}")

    def transform(self, original_size: Sequence[int]) -> ImageTransform:
        h, w = _size(original_size)
        side = int(self.size) if self.size is not None else max(h, w)
        return ResizeTransform(size=side, mode="pad_square").geometry((h, w))

    def __repr__(self) -> str:
        return f"PadToSquareFrame(size={self.size})"


@dataclass(frozen=True, repr=False)
class SmartResizeFrame(Frame):
    """Absolute pixels of Qwen2-VL / Qwen2.5-VL's resized input (:func:`smart_resize`)."""

    min_pixels: int = QWEN_MIN_PIXELS
    max_pixels: int = QWEN_RELEASED_MAX_PIXELS
    factor: int = QWEN_FACTOR
    name = "smart_resize"

    def __post_init__(self) -> None:
        if self.min_pixels > self.max_pixels or self.min_pixels < 1 or self.factor < 1:
            raise ValueError(
                f"SmartResizeFrame: need 1 <= min_pixels <= max_pixels and factor >= 1, got min_pixels="
                f"{self.min_pixels}, max_pixels={self.max_pixels}, factor={self.factor}"
            )

    def transform(self, original_size: Sequence[int]) -> ImageTransform:
        h, w = _size(original_size)
        nh, nw = smart_resize(h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return ImageTransform((h, w), (nh, nw), scale=(nw / w, nh / h), offset=(0.0, 0.0))

    def __repr__(self) -> str:
        return f"SmartResizeFrame(min_pixels={self.min_pixels}, max_pixels={self.max_pixels}, factor={self.factor})"


@dataclass(frozen=True, repr=False)
class NormalizedFrame(Frame):
    """Coordinates as fractions of a reference image times ``scale`` (1: 0..1, 1000: 0..1000).

    ``reference`` is the image the fractions are of: the original (default; the same as the
    ``smart_resize`` input, which keeps the whole image) or the padded square (Shikra)."""

    scale: float = 1.0
    reference: Frame = OriginalFrame()

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"NormalizedFrame: scale must be positive, got {self.scale}")
        if isinstance(self.reference, NormalizedFrame):
            raise ValueError("NormalizedFrame: the reference must be an image frame, not another normalised frame")

    @property
    def name(self) -> str:  # type: ignore[override]
        base = f"normalized_{self.scale:g}"
        return base if isinstance(self.reference, OriginalFrame) else f"{base}@{self.reference.name}"

    def transform(self, original_size: Sequence[int]) -> ImageTransform:
        return self.reference.transform(original_size)

    def units(self, original_size: Sequence[int]) -> tuple[float, float]:
        return float(self.scale), float(self.scale)

    def _units_to_reference(self, boxes: Tensor, original_size: Sequence[int]) -> Tensor:
        h, w = self.reference_size(original_size)
        return boxes / self.scale * torch.tensor([w, h, w, h], dtype=torch.float64)

    def _reference_to_units(self, boxes: Tensor, original_size: Sequence[int]) -> Tensor:
        h, w = self.reference_size(original_size)
        return boxes / torch.tensor([w, h, w, h], dtype=torch.float64) * self.scale

    def __repr__(self) -> str:
        return f"NormalizedFrame(scale={self.scale:g}, reference={self.reference!r})"


#: every frame name :func:`make_frame` knows (``vlzoo score --frame``; the diagnostic tries each)
FRAMES: tuple[str, ...] = (
    "original",
    "pad_to_square",
    "smart_resize",
    "normalized_1",
    "normalized_1000",
    "normalized_1@pad_to_square",
    "normalized_1000@pad_to_square",
)

#: the frame each family's model writes in (its codec's convention; docs/evaluation.md's table).
#: ``bins`` (Pix2Seq-style tokens) is a vlzoo-trained convention, in vlzoo's own input frame.
FAMILY_FRAMES: dict[str, str] = {
    "qwen2vl": "normalized_1000",
    "qwen2.5vl": "smart_resize",
    "paligemma": "original",
    "florence2": "original",
    "kosmos2": "original",
    "shikra": "normalized_1@pad_to_square",
    "bins": "pad_to_square",
}


def make_frame(
    name: str,
    *,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_RELEASED_MAX_PIXELS,
    factor: int = QWEN_FACTOR,
    square_size: int | None = None,
) -> Frame:
    """A frame by name (:data:`FRAMES`); ``min_pixels`` / ``max_pixels`` / ``factor`` set
    ``smart_resize``, ``square_size`` the side ``pad_to_square`` is resized to."""
    base, _, ref = str(name).partition("@")
    images = {
        "original": lambda: OriginalFrame(),
        "pad_to_square": lambda: PadToSquareFrame(size=square_size),
        "smart_resize": lambda: SmartResizeFrame(min_pixels=min_pixels, max_pixels=max_pixels, factor=factor),
    }
    scales = {"normalized_1": 1.0, "normalized_1000": 1000.0}
    if base in images and not ref:
        return images[base]()
    if base in scales and ref in ("", "original", "pad_to_square"):
        return NormalizedFrame(scale=scales[base], reference=images[ref or "original"]())
    raise ValueError(f"unknown coordinate frame {name!r}; choose from {', '.join(FRAMES)}")
