"""Prompt MLP, trigger-to-image cross-attention and mask losses of the embedding paradigm."""

from __future__ import annotations

import pytest
import torch

from vlzoo.decoders.prompt import PromptMLP, TriggerImageAttention, mask_losses, sincos_grid_encoding


def test_prompt_mlp_shapes():
    mlp = PromptMLP(hidden_size=32, prompt_dim=16, num_tokens=2)
    assert mlp(torch.randn(3, 32)).shape == (3, 2, 16)
    with pytest.raises(ValueError, match="num_tokens"):
        PromptMLP(hidden_size=32, num_tokens=0)


@pytest.mark.parametrize("source", ["projected", "lm", "vision"])
def test_trigger_attention_shapes(source):
    att = TriggerImageAttention(hidden_size=32, vision_dim=24, feature_grid=(4, 4), source=source, num_heads=4)
    width = 24 if source == "vision" else 32
    out, weights = att(torch.randn(2, 3, 32), torch.randn(2, 16, width))
    assert out.shape == (2, 3, 32) and weights.shape == (2, 3, 16)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3), atol=1e-5)
    with pytest.raises(ValueError, match="feature_grid"):
        att(torch.randn(2, 3, 32), torch.randn(2, 9, width))


def test_grid_encoding_distinguishes_cells():
    enc = sincos_grid_encoding((4, 4), 32)
    assert enc.shape == (16, 32)
    dist = torch.cdist(enc, enc) + torch.eye(16) * 10
    assert dist.min() > 0.1


def test_trigger_attention_can_select_a_token():
    """Queries that carry a token's content learn to read that token's position."""
    torch.manual_seed(0)
    att = TriggerImageAttention(hidden_size=32, feature_grid=(4, 4), num_heads=2)
    head = torch.nn.Linear(32, 2)
    opt = torch.optim.Adam([*att.parameters(), *head.parameters()], lr=3e-3)
    centres = torch.stack(torch.meshgrid((torch.arange(4) + 0.5) / 4, (torch.arange(4) + 0.5) / 4, indexing="ij"), -1)
    centres = centres.reshape(16, 2).flip(-1)  # (x, y)
    losses = []
    for _ in range(200):
        tokens = torch.randn(16, 16, 32) * 0.1
        which = torch.randint(0, 16, (16,))
        content = torch.randn(16, 32)
        tokens[torch.arange(16), which] += content
        out, _ = att(content[:, None, :], tokens)
        loss = (head(out[:, 0]).sigmoid() - centres[which]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def test_mask_losses_zero_when_equal():
    target = torch.zeros(2, 8, 8, dtype=torch.bool)
    target[0, 2:5, 2:6] = True
    target[1, :4] = True
    logits = (target.float() * 2 - 1) * 40
    iou_pred = torch.ones(2)
    for kind in ("bce", "focal"):
        parts = mask_losses(logits, target, iou_pred=iou_pred, kind=kind)
        assert set(parts) == {kind, "dice", "iou"}
        assert all(v.item() < 1e-6 for v in parts.values()), parts
    wrong = mask_losses(-logits, target, iou_pred=iou_pred)
    assert wrong["bce"].item() > 1 and wrong["dice"].item() > 0.9 and wrong["iou"].item() > 0.9
    with pytest.raises(ValueError, match="paradigm.mask_loss"):
        mask_losses(logits, target, kind="l2")


def test_mask_losses_gradients():
    logits = torch.zeros(1, 8, 8, requires_grad=True)
    iou = torch.full((1,), 0.5, requires_grad=True)
    parts = mask_losses(logits, torch.ones(1, 8, 8), iou_pred=iou, kind="focal")
    sum(parts.values()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert iou.grad is not None
