"""SamMaskDecoder: SAM's outputs, batching, extra sparse prompts, official checkpoint layout."""

from __future__ import annotations

import pytest
import torch

from vlzoo.decoders.sam import SamMaskDecoder


def test_matches_segment_anything_on_one_image():
    dec = SamMaskDecoder(variant="tiny").eval()
    assert dec.embed_dim == 32 and dec.image_embedding_size == (8, 8)
    emb = torch.randn(1, 32, 8, 8)
    coords, labels = torch.tensor([[[10.0, 20.0], [40.0, 50.0]]]), torch.tensor([[1, 0]])
    box = torch.tensor([[5.0, 5.0, 30.0, 40.0]])
    masks, iou = dec(emb, points=(coords, labels), boxes=box, multimask_output=True)
    sparse, dense = dec.prompt_encoder(points=(coords, labels), boxes=box, masks=None)
    ref_masks, ref_iou = dec.mask_decoder(emb, dec.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)
    assert masks.shape == (1, 3, 32, 32) and iou.shape == (1, 3)
    assert torch.allclose(masks, ref_masks, atol=1e-5) and torch.allclose(iou, ref_iou, atol=1e-5)
    single, one_iou = dec(emb, points=(coords, labels), boxes=box)
    assert single.shape == (1, 1, 32, 32) and one_iou.shape == (1, 1)


def test_batch_pairs_image_b_with_prompt_b():
    dec = SamMaskDecoder(variant="tiny").eval()
    emb = torch.randn(2, 32, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 10.0, 60.0, 50.0]])
    both, _ = dec(emb, boxes=boxes)
    for i in range(2):
        alone, _ = dec(emb[i : i + 1], boxes=boxes[i : i + 1])
        assert torch.allclose(both[i], alone[0], atol=1e-5)


def test_extra_sparse_embeddings_are_appended_and_trainable():
    dec = SamMaskDecoder(variant="tiny").eval()
    emb = torch.randn(2, 32, 8, 8)
    seg = torch.randn(2, 1, 32, requires_grad=True)
    masks, _ = dec(emb, sparse_embeddings=seg)  # LISA: the [SEG] embedding is the only prompt
    sparse, dense = dec.prompt_encoder(points=None, boxes=None, masks=None)
    ref, _ = dec.mask_decoder(emb[:1], dec.image_pe(), seg[:1], dense, multimask_output=False)
    assert torch.allclose(masks[:1], ref, atol=1e-5)
    masks.sum().backward()
    assert seg.grad is not None and seg.grad.abs().sum() > 0
    box = torch.tensor([[0.0, 0.0, 20.0, 20.0]] * 2)
    with_box, _ = dec(emb, boxes=box, sparse_embeddings=seg.detach())
    box_only, _ = dec(emb, boxes=box)
    assert not torch.allclose(with_box, box_only)
    with pytest.raises(ValueError, match="sparse_embeddings"):
        dec(emb, sparse_embeddings=torch.randn(2, 1, 16))
    with pytest.raises(ValueError, match="expects"):
        dec(torch.randn(1, 32, 4, 4), boxes=box[:1])


def test_mask_prompt_changes_the_output():
    dec = SamMaskDecoder(variant="tiny").eval()
    emb = torch.randn(1, 32, 8, 8)
    box = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    plain, _ = dec(emb, boxes=box)
    prompted, _ = dec(emb, boxes=box, mask_inputs=torch.randn(1, 1, 32, 32))
    assert prompted.shape == plain.shape and not torch.allclose(prompted, plain)


def test_loads_official_key_layout(tmp_path):
    torch.manual_seed(1)
    src = SamMaskDecoder(variant="tiny")
    state = dict(src.state_dict())
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(1)  # ignored
    torch.save(state, tmp_path / "sam_tiny.pth")
    torch.manual_seed(2)
    dst = SamMaskDecoder(variant="tiny", checkpoint=str(tmp_path / "sam_tiny.pth"))
    emb, box = torch.randn(1, 32, 8, 8), torch.tensor([[1.0, 2.0, 30.0, 40.0]])
    assert torch.allclose(dst(emb, boxes=box)[0], src(emb, boxes=box)[0])
    assert set(k.split(".")[0] for k in src.state_dict()) == {"prompt_encoder", "mask_decoder"}
    with pytest.raises(ValueError, match="does not match"):
        SamMaskDecoder(variant="tiny", transformer_dim=64, checkpoint=str(tmp_path / "sam_tiny.pth"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="SAM checkpoint"):
        SamMaskDecoder(variant="tiny", checkpoint=str(tmp_path / "other.pth"))


def test_official_variant_shape_without_weights():
    dec = SamMaskDecoder(variant="vit_h")
    assert dec.embed_dim == 256 and dec.image_embedding_size == (64, 64) and dec.input_image_size == 1024
    n = sum(p.numel() for p in dec.parameters())
    assert 3_900_000 < n < 4_200_000  # SAM's prompt encoder + mask decoder: ~4.06 M parameters
