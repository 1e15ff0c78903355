"""LENS paradigm: attention reading on a real tiny LMM, the frozen guarantees, loss falls."""

from __future__ import annotations

import copy

import pytest
import torch

from vlzoo.backbones import CausalLM, MultimodalBackbone, TimmVisionEncoder
from vlzoo.data import ShapesDataset, VLDataModule
from vlzoo.decoders.sam import SamMaskDecoder
from vlzoo.paradigms.attention_keypoints import AttentionKeypoints, AttentionKeypointsAnswer

IMAGE = 64
LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 256}
VIT = {"model_name": "vit_tiny_patch16_224", "img_size": IMAGE,
       "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}}


def make_backbone() -> MultimodalBackbone:
    torch.manual_seed(0)
    return MultimodalBackbone(
        vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes")
    )


def make_paradigm(backbone: MultimodalBackbone | None = None, **kwargs) -> AttentionKeypoints:
    backbone = backbone or make_backbone()
    torch.manual_seed(1)
    return AttentionKeypoints(
        backbone=backbone,
        head_channels=16,
        mask_decoder=SamMaskDecoder(variant="tiny", image_embedding_size=backbone.feature_grid[0], input_image_size=backbone.input_size),
        **kwargs,
    )


def make_batches(backbone: MultimodalBackbone, *, tasks=("res",), n: int = 8, batch_size: int = 4, split="train",
                 template: str | None = None):
    extra = {} if template is None else {"template": template}
    dm = VLDataModule(
        **extra,
        train=ShapesDataset(split=split, size=n, image_size=IMAGE, tasks=list(tasks), num_objects=(1, 3)),
        batch_size=batch_size,
        tokenizer=backbone.tokenizer,
        answer_format=AttentionKeypointsAnswer(),
        image_mean=backbone.data_config["mean"],
        image_std=backbone.data_config["std"],
        image_size=IMAGE,
    )
    collate = dm.collate()
    ds = dm.train_dataset
    return [collate([ds[i] for i in range(s, min(n, s + batch_size))]) for s in range(0, n, batch_size)]


@pytest.fixture(scope="module")
def backbone():
    return make_backbone()


def test_attention_is_read_from_query_text_to_image_tokens(backbone):
    paradigm = make_paradigm(backbone, attention_layers=[-1], attention_heads=[0, 2])
    batch = make_batches(backbone, n=2, batch_size=2)[0]
    assert paradigm.attention_layers == [1]
    reading = paradigm._read(batch)
    grid = backbone.feature_grid
    assert reading.attention.shape == (2, 2, *grid)
    assert reading.heatmap.shape == (2, grid[0] * 2, grid[1] * 2)
    # recompute by hand: rows = prompt text after the image (pooling starts as a plain mean)
    out = backbone(images=batch.images, input_ids=batch.prompt_ids, attention_mask=batch.prompt_attention_mask,
                   output_attentions=[1])
    for b in range(2):
        img = out.image_positions[b]
        rows = [t for t in range(int(img[-1]) + 1, out.attention_mask.shape[1]) if out.attention_mask[b, t]]
        n_text = int(batch.prompt_attention_mask[b].sum()) - 2  # minus bos and <image>
        assert len(rows) == n_text
        att = out.attentions[1][b][[0, 2]][:, rows][:, :, img].mean(1)  # (heads, N)
        expected = att / att.sum(-1, keepdim=True) * att.shape[-1]
        assert torch.allclose(reading.attention[b].flatten(1), expected, atol=1e-5)


def test_language_image_source_reads_the_frozen_image_token_states(backbone):
    """image_source: language - with the instruction first, the head reads the LMM's last hidden
    states at the image tokens (query-aware), still from the one frozen pass."""
    paradigm = make_paradigm(backbone, image_source="language")
    batch = make_batches(backbone, n=2, batch_size=2, template="user: {prompt} {image} assistant:")[0]
    reading = paradigm._read(batch)
    h, w = backbone.feature_grid
    assert reading.image_features.shape == (2, backbone.hidden_size, h, w)
    out = backbone(images=batch.images, input_ids=batch.prompt_ids, attention_mask=batch.prompt_attention_mask)
    for b in range(2):
        states = out.hidden_states[b, out.image_positions[b]]  # (N, hidden)
        assert torch.allclose(reading.image_features[b].flatten(1).T, states, atol=1e-5)
        # the instruction really comes first: text tokens sit before the image tokens
        first = int(out.image_positions[b, 0])
        assert int(out.attention_mask[b, :first].sum()) > 2
    # the query pooling reads only what follows the image ("assistant:"), and attention is read
    assert reading.attention.shape[-2:] == (h, w) and torch.isfinite(reading.heatmap).all()
    parts = paradigm.loss(batch)
    paradigm.weighted_total(parts).backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert paradigm.mask_head.neck[0].weight.grad is not None
    with pytest.raises(ValueError, match="image_source"):
        make_paradigm(backbone, image_source="pixels")
    with pytest.raises(ValueError, match="paradigm.match_heads needs paradigm.use_image_features"):
        make_paradigm(backbone, match_heads=2, use_image_features=False)
    matched = make_paradigm(backbone, image_source="language", match_heads=2)
    assert matched.head.match_key.in_channels == backbone.hidden_size
    assert torch.equal(reading.mask_features, reading.image_features)  # mask_source follows image_source
    with pytest.raises(ValueError, match="mask_source"):
        make_paradigm(backbone, mask_source="pixels")
    # SAM's embeddings from the vision map while the head reads the LMM's states
    split = make_paradigm(backbone, image_source="language", mask_source="vision")
    both = split._read(batch)
    assert torch.equal(both.mask_features, out.image_features)
    assert torch.equal(both.image_features, reading.image_features)
    assert split.mask_head.neck[0].in_channels == backbone.vision_width


def test_rejects_lora_and_bad_layer_choice(backbone):
    with pytest.raises(ValueError, match="attention_layers"):
        make_paradigm(backbone, attention_layers=[5])
    with pytest.raises(ValueError, match="attention_heads"):
        make_paradigm(backbone, attention_heads=[4])
    lora = MultimodalBackbone(
        vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"),
        lora={"r": 2, "target_modules": ["q_proj"]},
    )
    with pytest.raises(ValueError, match="lora"):
        make_paradigm(lora)


def _lm_behaviour(backbone, batch):
    with torch.no_grad():
        text_ids = backbone.tokenizer(["user: describe the image. assistant:"], return_tensors="pt").input_ids
        text_logits = backbone.language.model(input_ids=text_ids).logits
        out = backbone(images=batch.images, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        generated = backbone.generate(batch.images, batch.prompt_ids, batch.prompt_attention_mask, max_new_tokens=6)
    return text_logits, out.logits, generated


def test_training_the_head_leaves_the_lmm_untouched(backbone, tmp_path):
    import lightning as L

    paradigm = make_paradigm(backbone, point_jitter=1.0)
    batches = make_batches(backbone, tasks=("res", "rec"), n=8)
    before_state = copy.deepcopy(backbone.state_dict())
    before = _lm_behaviour(backbone, batches[0])
    fingerprint = paradigm.backbone_fingerprint()
    assert all(not p.requires_grad for p in backbone.parameters())
    assert backbone.added_tokens == ["<image>"]  # no special token of the paradigm

    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(paradigm, train_dataloaders=loader)
    assert trainer.global_step == 4
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert all(p.grad is not None for p in paradigm.pooling.parameters())  # the head did train
    assert not backbone.training  # Lightning's train() did not switch the LMM to train mode
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    after = _lm_behaviour(backbone, batches[0])
    for a, b in zip(before, after, strict=False):
        assert torch.equal(a, b)
    assert paradigm.backbone_fingerprint() == fingerprint

    # the head alone: small, and loads onto the same frozen LMM
    path = tmp_path / "head.pt"
    paradigm.save_head(path)
    head = paradigm.head_state_dict()
    assert head and not any(k.startswith("backbone.") for k in head)
    head_bytes = sum(v.numel() * v.element_size() for v in head.values())
    lm_bytes = sum(v.numel() * v.element_size() for v in backbone.state_dict().values())
    assert head_bytes < lm_bytes  # even against this 2-layer, 32-wide LMM
    assert path.stat().st_size < head_bytes + 200_000  # tensors plus pickle overhead, no LMM inside
    fresh = make_paradigm(backbone, point_jitter=1.0)
    fresh.load_head(path)
    fresh.eval()
    paradigm.eval()
    p1, p2 = paradigm.predict(batches[0]), fresh.predict(batches[0])
    for a, b in zip(p1, p2, strict=False):
        assert torch.equal(a.masks, b.masks) and torch.allclose(a.boxes, b.boxes)
    other = make_paradigm(MultimodalBackbone(
        vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes")))
    with pytest.raises(ValueError, match="different frozen LMM"):
        other.load_head(path)


@pytest.mark.parametrize("multimask", [False, True])
def test_predictions_have_masks_boxes_and_evidence(backbone, multimask):
    paradigm = make_paradigm(backbone, multimask=multimask).eval()
    batch = make_batches(backbone, tasks=("res", "rec", "seg"), n=6, batch_size=6)[0]
    preds = paradigm.predict(batch)
    assert len(preds) == 6
    for pred, task in zip(preds, batch.tasks, strict=False):
        n = len(pred)
        assert pred.masks.shape == (n, IMAGE, IMAGE) and pred.masks.dtype == torch.bool
        assert pred.boxes.shape == (n, 4) and pred.scores.shape == (n,)
        if task in ("res", "rec"):
            assert n == 1
        assert pred.evidence["heatmap"].shape == (16, 16)
        assert pred.evidence["points"].shape == (n, 2)
    # a non-empty mask's box is its extent
    for pred in preds:
        for m, b in zip(pred.masks, pred.boxes, strict=False):
            if m.any():
                ys, xs = m.nonzero(as_tuple=True)
                assert b.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_loss_falls(backbone):
    paradigm = make_paradigm(backbone, point_jitter=0.0)
    batches = make_batches(backbone, tasks=("res",), n=4, batch_size=4)
    opt = torch.optim.AdamW([p for p in paradigm.parameters() if p.requires_grad], lr=3e-3)
    paradigm.train()
    losses = []
    for _ in range(25):
        parts = paradigm.loss(batches[0])
        total = paradigm.weighted_total(parts)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append({k: v.item() for k, v in parts.items()} | {"total": total.item()})
    assert losses[-1]["total"] < 0.6 * losses[0]["total"]
    assert losses[-1]["heatmap"] < losses[0]["heatmap"]
    assert losses[-1]["mask_dice"] < losses[0]["mask_dice"]
