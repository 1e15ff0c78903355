"""Boxes, masks and keypoints move with the image and come back through ImageTransform."""

from __future__ import annotations

import pytest
import torch

from vlzoo.data.transforms import ResizeTransform
from vlzoo.structures import Targets


def _targets(h: int, w: int) -> Targets:
    masks = torch.zeros((2, h, w), dtype=torch.bool)
    masks[0, 10:30, 5:25] = True
    masks[1, 40:h - 2, 30:w - 3] = True
    boxes = torch.tensor([[5.0, 10.0, 25.0, 30.0], [30.0, 40.0, w - 3.0, h - 2.0]])
    kps = torch.tensor([[[5.0, 10.0, 2.0], [25.0, 30.0, 1.0]], [[30.0, 40.0, 2.0], [w - 3.0, h - 2.0, 0.0]]])
    return Targets(boxes=boxes, masks=masks, keypoints=kps, areas=masks.flatten(1).sum(1).float(), image_size=(h, w))


@pytest.mark.parametrize("mode", ["pad_square", "resize"])
@pytest.mark.parametrize("hw", [(64, 48), (50, 80), (64, 64)])
@pytest.mark.parametrize("size", [32, 96, 128])
def test_round_trip(mode, hw, size):
    h, w = hw
    tr = ResizeTransform(size=size, mode=mode, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
    t = _targets(h, w)
    x, ti, geo = tr(image, t)
    assert x.shape == (3, size, size) and ti.image_size == (size, size)
    # boxes: forward is the affine map, back is exact
    assert torch.allclose(geo.boxes_to_original(ti.boxes), t.boxes, atol=1e-4)
    assert torch.allclose(geo.points_to_original(ti.keypoints), t.keypoints, atol=1e-4)
    assert torch.equal(ti.keypoints[..., 2], t.keypoints[..., 2])  # visibility untouched
    # masks: the transformed mask's tight box agrees with the transformed box (within a pixel)
    for m, box in zip(ti.masks, ti.boxes, strict=True):
        ys, xs = torch.nonzero(m, as_tuple=True)
        tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(tight, box, atol=1.01)
    back = geo.masks_to_original(ti.masks)
    iou = (back & t.masks).flatten(1).sum(1) / (back | t.masks).flatten(1).sum(1)
    assert bool((iou > (0.99 if size >= max(h, w) else 0.8)).all())


def test_pad_square_centres_and_pads_with_mean():
    tr = ResizeTransform(size=64, mode="pad_square", mean=(0.2, 0.4, 0.6), std=(1.0, 1.0, 1.0))
    image = torch.full((3, 32, 64), 255, dtype=torch.uint8)
    x, geo = tr.image(image)
    assert geo.offset == (0.0, 16.0) and geo.scale == (1.0, 1.0)
    assert torch.allclose(x[:, 0, 0], torch.zeros(3))  # padding = mean colour -> 0 after normalising
    assert torch.allclose(x[:, 32, 32], torch.tensor([0.8, 0.6, 0.4]))  # centred content (1 - mean)
    assert torch.allclose(x[:, 63, 0], torch.zeros(3))


def test_normalisation():
    tr = ResizeTransform(size=8, mode="resize", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, _ = tr.image(torch.zeros((3, 8, 8), dtype=torch.uint8))
    assert torch.allclose(x, torch.full_like(x, -1.0))
    with pytest.raises(ValueError, match="mode"):
        ResizeTransform(mode="crop")
