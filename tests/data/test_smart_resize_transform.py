"""SmartResizeTransform: Qwen's input frame as a transform (the same map as the smart_resize
frame), targets moved with the image, and the collate's refusal of a batch of mixed sizes."""

from __future__ import annotations

import pytest
import torch

from vlzoo.data.errors import DataError
from vlzoo.data.frames import SmartResizeFrame
from vlzoo.data.smart_resize import SmartResizeTransform
from vlzoo.structures import Targets


def test_the_map_is_the_smart_resize_frames():
    transform = SmartResizeTransform(min_pixels=3136, max_pixels=16384 * 28 * 28)
    frame = SmartResizeFrame(min_pixels=3136, max_pixels=16384 * 28 * 28)
    for size in [(480, 640), (427, 640), (100, 1000), (37, 53), (2000, 1500)]:
        assert transform.geometry(size) == frame.transform(size)
    assert transform.geometry((480, 640)).input_size == (476, 644)


def test_image_and_targets_move_together():
    transform = SmartResizeTransform(min_pixels=64, max_pixels=64 * 64, factor=8)
    image = torch.full((3, 30, 50), 255, dtype=torch.uint8)
    masks = torch.zeros(1, 30, 50, dtype=torch.bool)
    masks[0, 10:20, 10:30] = True
    targets = Targets(boxes=torch.tensor([[10.0, 10.0, 30.0, 20.0]]), labels=torch.tensor([1]), masks=masks,
                      image_size=(30, 50))
    x, moved, geo = transform(image, targets)
    assert x.shape == (3, 32, 48) and geo.input_size == (32, 48) and moved.image_size == (32, 48)
    white = (1.0 - torch.tensor(transform.mean)) / torch.tensor(transform.std)
    assert torch.allclose(x.mean((1, 2)), white, atol=1e-3)  # normalised with the given statistics
    assert torch.allclose(moved.boxes, torch.tensor([[10 * 48 / 50, 10 * 32 / 30, 30 * 48 / 50, 20 * 32 / 30]]))
    assert moved.masks.shape == (1, 32, 48)
    assert torch.allclose(geo.boxes_to_original(moved.boxes), targets.boxes, atol=1e-4)


def test_the_collate_refuses_a_batch_of_mixed_input_sizes():
    from vlzoo.data import ShapesDataset
    from vlzoo.data.datamodule import VLDataModule

    a = ShapesDataset(split="train", size=1, image_size=64, tasks=["rec"])[0]
    b = ShapesDataset(split="train", size=1, image_size=48, tasks=["rec"])[0]
    dm = VLDataModule(image_transform=SmartResizeTransform(min_pixels=64, max_pixels=128 * 128, factor=8))
    collate = dm.collate(require_answers=False)  # the base answer format writes no box
    assert collate([a]).images.shape[-2:] == (64, 64) and collate([b]).images.shape[-2:] == (48, 48)
    with pytest.raises(DataError, match="different input sizes .* batch_size: 1"):
        collate([a, b])
