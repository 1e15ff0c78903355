"""Paradigms on the Florence-2 backbone through recipes: pixel2seq with the florence2 codec trains
on Shapes in Florence-2's frame (60 px images resized to the backbone's 64 px square), heatmap reads
encoder image states and the decoder's [LOC] state, and what needs attention maps is refused."""

from __future__ import annotations

import pytest
import torch

from vlzoo.build import build
from vlzoo.config import recipe_from_dict
from vlzoo.data.transforms import ResizeTransform

from .florence_tiny import make_florence_folder
from .native_recipes import RECIPES, shapes_recipe, train_steps


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_florence_folder(tmp_path_factory.mktemp("florence2"))


def _recipe(folder: str, paradigm: dict, template: object = "{prompt}") -> dict:
    return shapes_recipe({"_target_": "vlzoo.backbones.Florence2Backbone", "name_or_path": folder}, paradigm, template)




@pytest.mark.slow
def test_pixel2seq_with_the_florence2_codec_trains_in_florences_frame(folder):
    paradigm = {"_base_": str(RECIPES / "paradigm" / "pixel2seq.yaml"), "tasks": ["rec"], "max_new_tokens": 8,
                "coordinate_sigma": 0.0, "codec": {"_target_": "vlzoo.paradigms.codecs.Florence2Codec"}}
    template = {"_target_": "vlzoo.backbones.Florence2Template", "text": "<OPEN_VOCABULARY_DETECTION>{prompt}"}
    built = build(recipe_from_dict(_recipe(folder, paradigm, template)))
    dm = built.datamodule
    assert isinstance(dm.transform, ResizeTransform) and dm.transform.mode == "resize"  # the backbone's frame
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[-2:] == (64, 64)
    geo = batch.transforms[0]
    assert geo.original_size == (60, 60) and geo.input_size == (64, 64) and geo.offset == (0.0, 0.0)
    tok = built.backbone.tokenizer
    prompt = tok.decode(batch.prompt_ids[0][batch.prompt_attention_mask[0].bool()])
    assert "Locate" in prompt or "locate" in prompt  # the task token expanded as the processor does
    answer = batch.answers[0]
    assert answer.startswith("<loc_") and answer.count("<loc_") == 4
    # the answer's bins are the whole original image's (the frame keeps no aspect ratio)
    box = batch.original_targets[0].boxes[:1]
    bins = (box / 60 * 1000).floor().clamp(0, 999).long()[0].tolist()
    assert answer == "".join(f"<loc_{k}>" for k in bins) or sum(
        abs(int(a) - b) for a, b in zip(answer.replace("<loc_", " ").replace(">", " ").split(), bins, strict=True)) <= 2
    assert tok.unk_token_id not in batch.input_ids[batch.labels != -100].tolist()
    losses = train_steps(built.model, batch, 12)
    assert losses[-1] < 0.8 * losses[0], losses
    built.model.eval()
    preds = built.model.predict(batch)
    assert len(preds) == 8 and all(p.image_size == (64, 64) for p in preds)
    assert sum(p.parsed for p in preds) == 8  # the grammar holds the decoder to four <loc_k>
    back = geo.boxes_to_original(torch.tensor([[0.0, 0.0, 64.0, 64.0]]))
    assert torch.allclose(back, torch.tensor([[0.0, 0.0, 60.0, 60.0]]))


@pytest.mark.slow
def test_heatmap_reads_encoder_image_states_and_the_decoders_loc_state(folder):
    paradigm = {"_base_": str(RECIPES / "paradigm" / "heatmap.yaml"), "tasks": ["rec"],
                "aligner": {"dim": 32, "depth": 1, "heads": 2}}
    built = build(recipe_from_dict(_recipe(folder, paradigm)))
    model = built.model
    assert model.feature_grid == (8, 8)
    batch = next(iter(built.datamodule.train_dataloader()))
    losses = train_steps(model, batch, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.eval()
    preds = model.predict(batch)
    assert len(preds) == 8 and all(p.boxes.shape[-1] == 4 for p in preds)
    model.route = "generated"  # [LOC] read from the decoding pass: the decoder's state, encoder image states
    preds = model.predict(batch)
    assert len(preds) == 8


def test_refocusing_and_attention_keypoints_are_refused_with_the_key(folder):
    """Both read text-to-image self-attention, which an encoder-decoder has not: refused when
    built, naming the recipe key; the backbone refuses attention maps in a pass too."""
    from vlzoo.backbones import Florence2Backbone
    from vlzoo.config.recipe import RecipeError
    from vlzoo.paradigms import AttentionKeypoints

    paradigm = {"_base_": str(RECIPES / "paradigm" / "pixel2emb.yaml"), "tasks": ["rec"], "refocus_lambda": 0.1}
    with pytest.raises((ValueError, RecipeError), match="paradigm.refocus_lambda: 0"):
        build(recipe_from_dict(_recipe(folder, paradigm)))
    with pytest.raises(ValueError, match=r"paradigm\._target_.*pick pixel2seq, heatmap or pixel2emb"):
        AttentionKeypoints(backbone=Florence2Backbone(name_or_path=folder), tasks=["res"])


@pytest.mark.slow
def test_pixel2emb_reads_the_decoders_trigger_state(folder):
    """NExT-Chat's <trigger><loc>: the trigger state (a decoder state) gives the box, the <loc>
    input embedding (the box encoder's) enters the decoder, in training and in cached decoding."""
    paradigm = {"_base_": str(RECIPES / "paradigm" / "pixel2emb.yaml"), "tasks": ["rec"], "mask_decoder": None}
    built = build(recipe_from_dict(_recipe(folder, paradigm)))
    model = built.model
    batch = next(iter(built.datamodule.train_dataloader()))
    losses = train_steps(model, batch, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.eval()
    preds = model.predict(batch)
    assert len(preds) == 8
