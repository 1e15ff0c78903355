"""Paradigms on the Kosmos-2 backbone through recipes: pixel2seq with the kosmos2 codec trains on
Shapes in Kosmos-2's frame (60 px images resized to the tower's 32 px), heatmap and pixel2emb build
and step, attention_keypoints refuses it."""

from __future__ import annotations

import pytest
import torch

from vlzoo.build import build
from vlzoo.config import recipe_from_dict
from vlzoo.data.transforms import ResizeTransform

from .kosmos2_tiny import RECIPES, make_kosmos2_folder
from .kosmos2_tiny import shapes_recipe as _recipe
from .native_recipes import train_steps


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_kosmos2_folder(tmp_path_factory.mktemp("kosmos2"))




@pytest.mark.slow
def test_pixel2seq_with_the_kosmos2_codec_trains_in_its_frame(folder):
    paradigm = {"_base_": str(RECIPES / "paradigm" / "pixel2seq.yaml"), "tasks": ["rec"], "max_new_tokens": 8,
                "coordinate_sigma": 0.0, "codec": {"_target_": "vlzoo.paradigms.codecs.Kosmos2Codec"}}
    built = build(recipe_from_dict(_recipe(folder, paradigm)))
    dm = built.datamodule
    assert isinstance(dm.transform, ResizeTransform) and dm.transform.mode == "resize"  # the backbone's frame
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[-2:] == (32, 32)
    geo = batch.transforms[0]
    assert geo.original_size == (60, 60) and geo.input_size == (32, 32) and geo.offset == (0.0, 0.0)
    tok = built.backbone.tokenizer
    row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert row[:3] == [tok.bos_token_id, *tok.convert_tokens_to_ids(["<image>", "<grounding>"])]
    answer = batch.answers[0]
    assert answer.startswith("<object><patch_index_") and answer.endswith("</object>")
    # the answer's patches are the original box's (the frame keeps fractions of the image)
    box = batch.original_targets[0].boxes[:1]
    from vlzoo.paradigms.codecs import Kosmos2Codec

    assert answer == Kosmos2Codec().encode(box, (60, 60))
    assert tok.unk_token_id not in batch.input_ids[batch.labels != -100].tolist()
    losses = train_steps(built.model, batch, 12)
    assert losses[-1] < 0.8 * losses[0], losses
    built.model.eval()
    preds = built.model.predict(batch)
    assert len(preds) == 8 and all(p.image_size == (32, 32) for p in preds)
    back = geo.boxes_to_original(torch.tensor([[0.0, 0.0, 32.0, 32.0]]))
    assert torch.allclose(back, torch.tensor([[0.0, 0.0, 60.0, 60.0]]))


def test_heatmap_builds_and_steps_on_a_kosmos2_backbone(folder):
    paradigm = {"_base_": str(RECIPES / "paradigm" / "heatmap.yaml"), "tasks": ["rec"],
                "aligner": {"dim": 32, "depth": 1, "heads": 2}}
    built = build(recipe_from_dict(_recipe(folder, paradigm)))
    model = built.model
    assert model.feature_grid == (4, 4)  # the tower's patch grid
    batch = next(iter(built.datamodule.train_dataloader()))
    losses = train_steps(model, batch, 6, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    model.eval()
    preds = model.predict(batch)
    assert len(preds) == 8 and all(p.boxes.shape[-1] == 4 for p in preds)


def test_pixel2emb_builds_and_steps_on_a_kosmos2_backbone(folder):
    paradigm = {"_base_": str(RECIPES / "paradigm" / "pixel2emb.yaml"), "tasks": ["rec"]}
    built = build(recipe_from_dict(_recipe(folder, paradigm)))
    batch = next(iter(built.datamodule.train_dataloader()))
    losses = train_steps(built.model, batch, 6, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    built.model.eval()
    preds = built.model.predict(batch)
    assert len(preds) == 8 and all(p.boxes.shape[-1] == 4 for p in preds)


def test_attention_keypoints_says_why_not(folder):
    """Kosmos-2's 64 image tokens are latent queries, not the tower's grid: the paradigm that reads
    the LM's attention over them as a map refuses the backbone when it is built."""
    from vlzoo.backbones import Kosmos2Backbone
    from vlzoo.paradigms import AttentionKeypoints

    with pytest.raises(ValueError, match="4 image tokens that are not on its feature grid; use heatmap"):
        AttentionKeypoints(backbone=Kosmos2Backbone(name_or_path=folder), tasks=["res"])
