"""Coordinate frames (vlzoo.data.frames): vlzoo's smart_resize equals transformers' reference, and
every frame maps boxes to original pixels and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlzoo.data.frames import (
    FAMILY_FRAMES,
    FRAMES,
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    NormalizedFrame,
    OriginalFrame,
    PadToSquareFrame,
    SmartResizeFrame,
    make_frame,
    smart_resize,
)
from vlzoo.data.transforms import ResizeTransform

qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")

#: (min_pixels, max_pixels): the function's defaults, the released checkpoints' limits, tight ones
LIMITS = [
    (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS),
    (3136, 12845056),
    (256 * 28 * 28, 1280 * 28 * 28),
    (28 * 28, 64 * 28 * 28),
    (100 * 100, 100 * 100),
]


def _sizes(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """Random sizes: small, typical, huge, and near-extreme aspect ratios."""
    out = []
    for _ in range(n):
        kind = rng.integers(4)
        if kind == 0:
            h, w = rng.integers(1, 120, size=2)
        elif kind == 1:
            h, w = rng.integers(100, 2000, size=2)
        elif kind == 2:
            h, w = rng.integers(2000, 9000, size=2)
        else:
            h = int(rng.integers(1, 60))
            w = int(h * rng.uniform(150, 250))
            if rng.random() < 0.5:
                h, w = w, h
        out.append((int(h), int(w)))
    return out


@pytest.mark.parametrize("limits", LIMITS, ids=lambda v: f"{v[0]}-{v[1]}")
def test_smart_resize_equals_transformers(limits):
    min_pixels, max_pixels = limits
    rng = np.random.default_rng(min_pixels + max_pixels)
    checked = errors = 0
    for h, w in _sizes(rng, 1200):
        try:
            expected = qwen.smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError:
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
            errors += 1
            continue
        assert smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels) == tuple(expected), (h, w)
        checked += 1
    assert checked >= 1000 and errors > 10  # both branches really ran


def test_smart_resize_other_factors_and_exact_ties():
    # sides that are exact halves of the factor: Python's round (halves to even), as the reference
    for factor in (14, 28, 32):
        for h in range(factor // 2, 6 * factor, factor // 2 or 1):
            for w in (h, 3 * h, 7 * factor // 2):
                assert smart_resize(h, w, factor=factor) == tuple(qwen.smart_resize(h, w, factor=factor))


def test_smart_resize_refuses_what_cannot_be_resized():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201)
    with pytest.raises(ValueError):
        qwen.smart_resize(1, 201)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)  # the reference divides by zero
    with pytest.raises(ZeroDivisionError):
        qwen.smart_resize(0, 10)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(100, 100, min_pixels=5000, max_pixels=4000)
    assert smart_resize(1, 200) == tuple(qwen.smart_resize(1, 200))  # the limit itself is allowed


@pytest.mark.parametrize("name", FRAMES)
@pytest.mark.parametrize("size", [(64, 64), (480, 640), (427, 300)])
def test_every_frame_round_trips(name, size):
    frame = make_frame(name, square_size=224)
    assert frame.name == name
    h, w = size
    boxes = torch.tensor([[0.0, 0.0, w, h], [w * 0.1, h * 0.2, w * 0.6, h * 0.9], [3.5, 7.25, 10.0, 12.5]])
    there = frame.from_original(boxes, size)
    back = frame.to_original(there, size)
    assert torch.allclose(back, boxes, atol=1e-3)
    uh, uw = frame.units(size)
    assert there[0].tolist() == pytest.approx(
        frame.from_original(torch.tensor([[0.0, 0.0, w, h]]), size)[0].tolist())
    assert float(there[:, 0::2].max()) <= uw + 1e-6 and float(there[:, 1::2].max()) <= uh + 1e-6


def test_frame_values():
    size = (480, 640)  # H, W
    box = torch.tensor([[64.0, 48.0, 320.0, 240.0]])
    assert make_frame("normalized_1").from_original(box, size).tolist() == [[0.1, 0.1, 0.5, 0.5]]
    assert make_frame("normalized_1000").from_original(box, size).tolist() == [[100.0, 100.0, 500.0, 500.0]]
    # Qwen: 480 x 640 -> 476 x 644 (multiples of 28)
    sr = make_frame("smart_resize")
    assert sr.reference_size(size) == (476, 644)
    assert torch.allclose(sr.from_original(box, size), torch.tensor([[64 * 644 / 640, 48 * 476 / 480, 322.0, 238.0]],
                                                                     dtype=torch.float64))
    # pad to square: 640 x 640 with 80 px of padding above and below, then 224
    pad = make_frame("pad_to_square", square_size=224)
    geo = ResizeTransform(size=224, mode="pad_square").geometry(size)
    assert torch.allclose(pad.from_original(box, size).float(), geo.boxes_to_input(box))
    assert make_frame("pad_to_square").from_original(box, size).tolist() == [[64.0, 128.0, 320.0, 320.0]]
    shikra = make_frame("normalized_1@pad_to_square")
    assert shikra.from_original(box, size).tolist() == [[0.1, 0.2, 0.5, 0.5]]
    # a bin or patch index is a fraction of the reference image
    assert make_frame("smart_resize").fractions_to_original([[0.1, 0.1, 0.5, 0.5]], size)[0].tolist() == \
        pytest.approx([64.0, 48.0, 320.0, 240.0])


def test_answers_beyond_the_image_are_clamped():
    out = make_frame("normalized_1000").to_original([[-10, 500, 1200, 1000]], (100, 200))
    assert out.tolist() == [[0.0, 50.0, 200.0, 100.0]]


def test_make_frame_errors_and_parameters():
    with pytest.raises(ValueError, match="unknown coordinate frame 'pixels'"):
        make_frame("pixels")
    with pytest.raises(ValueError, match="unknown coordinate frame"):
        make_frame("normalized_1@smart_resize")
    with pytest.raises(ValueError, match="min_pixels"):
        SmartResizeFrame(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="size"):
        PadToSquareFrame(size=0)
    with pytest.raises(ValueError, match="original image size"):
        OriginalFrame().to_original([[0, 0, 1, 1]], (0, 5))
    assert make_frame("smart_resize", min_pixels=3136, max_pixels=3136).reference_size((480, 640)) == (28, 56)
    assert isinstance(make_frame("normalized_1000@pad_to_square"), NormalizedFrame)
    assert set(FAMILY_FRAMES.values()) <= set(FRAMES)
