"""SamPromptHead: the one SAM prompt head of every mask paradigm - neck, prompt frame, output size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlzoo.decoders import RENAMED_LOSS_PARTS, SamMaskDecoder, SamPromptHead, mask_loss_parts, mask_losses


def make_head(feature_dim: int = 24, input_size: int = 32) -> SamPromptHead:
    torch.manual_seed(0)
    # SAM's frame (64 px, 8 x 8 embeddings) differs from the network input (32 px, 4 x 4 features)
    return SamPromptHead(decoder=SamMaskDecoder(variant="tiny"), feature_dim=feature_dim, input_size=input_size).eval()


def test_prompts_are_scaled_into_sams_frame_and_logits_come_back_at_the_input_size():
    head = make_head()
    feats = torch.randn(2, 24, 4, 4)
    boxes = torch.tensor([[2.0, 4.0, 20.0, 30.0], [10.0, 0.0, 31.0, 12.0]])
    points = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None]
    extra = torch.randn(2, 1, 32)
    logits, iou = head(feats, boxes=boxes, points=points, sparse_embeddings=extra)
    assert logits.shape == (2, 32, 32) and iou.shape == (2,)
    # the same by hand: neck, resize to the decoder's grid, prompts x 2 (64 / 32), upsample
    emb = F.interpolate(head.neck(feats), size=(8, 8), mode="bilinear", align_corners=False)
    labels = torch.ones(2, 1, dtype=torch.long)
    low, ref_iou = head.decoder(emb, points=(points * 2, labels), boxes=boxes * 2, sparse_embeddings=extra)
    ref = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(logits, ref, atol=1e-5) and torch.allclose(iou, ref_iou[:, 0], atol=1e-5)


def test_the_neck_normalises_each_map_and_trains():
    head = make_head()
    emb = head.embed(torch.randn(3, 24, 4, 4) * 50 + 7)
    assert emb.shape == (3, 32, 8, 8)
    # one-group GroupNorm before the resize: every map at zero mean, unit variance
    normed = head.neck(torch.randn(3, 24, 4, 4) * 50 + 7)
    assert torch.allclose(normed.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(normed.var(dim=(1, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    logits, _ = head.train()(torch.randn(2, 24, 4, 4), boxes=torch.tensor([[0.0, 0, 16, 16]] * 2))
    logits.sum().backward()
    assert head.neck[0].weight.grad.abs().sum() > 0


def test_multimask_keeps_the_mask_of_highest_predicted_iou():
    head = make_head()
    feats = torch.randn(2, 24, 4, 4)
    points = torch.tensor([[[8.0, 8.0]], [[20.0, 24.0]]])
    logits, iou = head(feats, points=points, multimask=True)
    emb = head.embed(feats)
    labels = torch.ones(2, 1, dtype=torch.long)
    low, all_iou = head.decoder(emb, points=(points * 2, labels), multimask_output=True)
    best = all_iou.argmax(1)
    assert torch.equal(iou, all_iou[torch.arange(2), best])
    ref = F.interpolate(low[torch.arange(2), best][:, None], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(logits, ref[:, 0], atol=1e-5)


def test_a_decoder_without_sams_interface_is_named():
    with pytest.raises(ValueError, match="paradigm.mask_decoder .*embed_dim"):
        SamPromptHead(decoder=torch.nn.Linear(2, 2), feature_dim=8, input_size=32)


def test_mask_loss_parts_have_one_spelling():
    logits, target = torch.randn(3, 8, 8), torch.rand(3, 8, 8) > 0.5
    parts = mask_loss_parts(logits, target, iou_pred=torch.rand(3))
    assert set(parts) == {"mask_bce", "mask_dice", "mask_iou"}
    plain = mask_losses(logits, target, iou_pred=None)
    assert torch.equal(parts["mask_bce"], plain["bce"]) and torch.equal(parts["mask_dice"], plain["dice"])
    assert set(mask_loss_parts(logits, target, kind="focal")) == {"mask_focal", "mask_dice"}
    assert RENAMED_LOSS_PARTS == {"mask": "mask_bce", "dice": "mask_dice"}
