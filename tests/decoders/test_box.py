"""Box decoder / encoder of the embedding paradigm: shapes, exact-zero losses, gradient paths."""

from __future__ import annotations

import pytest
import torch

from vlzoo.decoders.box import (
    BoxDecoder,
    BoxEncoder,
    box_cycle_losses,
    box_losses,
    denormalise_boxes,
    normalise_boxes,
    valid_boxes,
)


def test_shapes_and_range():
    dec, enc = BoxDecoder(hidden_size=32), BoxEncoder(hidden_size=32)
    assert dec.mlp[0].out_features == 16 and dec.mlp[-1].out_features == 4
    assert enc.mlp[0].in_features == 4 and enc.mlp[0].out_features == 16
    out = dec(torch.randn(2, 3, 32))
    assert out.shape == (2, 3, 4)
    assert bool(((out > 0) & (out < 1)).all())
    assert enc(torch.rand(5, 4)).shape == (5, 32)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        enc(torch.rand(5, 3))


def test_losses_zero_when_prediction_equals_target():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]])
    parts = box_losses(boxes.clone(), boxes)
    assert parts["l1"].item() == 0.0
    assert parts["giou"].abs().item() < 1e-6
    wrong = box_losses(boxes.flip(0), boxes)
    assert wrong["l1"].item() > 0 and wrong["giou"].item() > 0


def test_giou_only_on_valid_predictions():
    target = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]])
    # the first prediction is unordered (x2 < x1): GIoU must ignore it, L1 must not
    pred = torch.tensor([[0.4, 0.1, 0.1, 0.4], [0.5, 0.5, 0.9, 0.9]], requires_grad=True)
    parts = box_losses(pred, target)
    assert parts["giou"].abs().item() < 1e-6
    assert parts["l1"].item() > 0
    none_valid = box_losses(torch.full((2, 4), 0.5, requires_grad=True), target)
    assert none_valid["giou"].item() == 0.0 and none_valid["giou"].requires_grad
    empty = box_losses(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4))
    assert empty["l1"].item() == 0.0


def test_cycle_losses_gradients():
    dec, enc = BoxDecoder(hidden_size=32), BoxEncoder(hidden_size=32)
    hidden = torch.randn(3, 32, requires_grad=True)
    decoded = dec(hidden)
    parts = box_cycle_losses(enc, dec, hidden=hidden, decoded=decoded, boxes=torch.rand(3, 4))
    parts["embedding"].backward()
    # the embedding cycle trains the encoder only: no gradient to the LM state nor the decoder
    assert hidden.grad is None
    assert all(p.grad is None for p in dec.parameters())
    assert all(p.grad is not None for p in enc.parameters())
    enc.zero_grad()
    parts = box_cycle_losses(enc, dec, hidden=hidden, decoded=dec(hidden), boxes=torch.rand(3, 4))
    parts["box"].backward()
    assert all(p.grad is not None for p in dec.parameters())
    assert all(p.grad is not None for p in enc.parameters())


def test_normalise_roundtrip_orders_corners():
    boxes = torch.tensor([[8.0, 4.0, 40.0, 60.0]])
    norm = normalise_boxes(boxes, (64, 64))
    assert torch.allclose(denormalise_boxes(norm, (64, 64)), boxes)
    swapped = norm[:, [2, 3, 0, 1]]
    assert not bool(valid_boxes(swapped).any())
    assert torch.allclose(denormalise_boxes(swapped, (64, 64)), boxes)


def test_decoder_learns_a_box():
    dec = BoxDecoder(hidden_size=16)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    x, target = torch.randn(8, 16), torch.rand(8, 2).repeat(1, 2) * torch.tensor([0.5, 0.5, 1, 1]) + torch.tensor([0, 0, 0.4, 0.4])
    target = target.clamp(0, 1)
    first = None
    for _ in range(150):
        parts = box_losses(dec(x), target)
        loss = 2.0 * parts["l1"] + 0.2 * parts["giou"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
