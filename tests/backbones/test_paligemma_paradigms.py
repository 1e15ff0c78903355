"""Paradigms on the PaliGemma backbone through recipes: the collate writes exactly the
processor's rows (layout, token_type_ids); pixel2seq with the paligemma codec trains on Shapes in
PaliGemma's frame (60 px images resized to the tower's 32 px square); heatmap builds and steps."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones.paligemma import SquareResizeTransform
from vlzoo.build import build
from vlzoo.config import recipe_from_dict

from .native_recipes import train_steps
from .paligemma_tiny import RECIPES, make_paligemma_folder
from .paligemma_tiny import shapes_pixel2seq as _pixel2seq
from .paligemma_tiny import shapes_recipe as _recipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_paligemma_folder(tmp_path_factory.mktemp("paligemma"))




def test_the_collate_writes_the_processors_rows(folder):
    """The same prompt and answer through PaliGemmaProcessor (prompt, suffix) give the same ids
    and token_type_ids as vlzoo's collate and splice; the prompt rows are the processor's prefix."""
    from transformers import AutoImageProcessor, AutoTokenizer, PaliGemmaProcessor

    built = build(recipe_from_dict(_recipe(folder, _pixel2seq())))
    bb, dm = built.backbone, built.datamodule
    assert isinstance(dm.transform, SquareResizeTransform)  # the backbone's frame, injected
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[-2:] == (32, 32)
    assert batch.answers[0].startswith("<loc") and batch.prompts[0].count("\n") == 0
    processor = PaliGemmaProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                                   tokenizer=AutoTokenizer.from_pretrained(folder))
    ref = processor(images=[torch.zeros(3, 60, 60, dtype=torch.uint8)] * 8, text=["<image>" + p for p in batch.prompts],
                    suffix=batch.answers, padding="longest", return_tensors="pt")
    mine = bb.native_inputs(batch.images, batch.input_ids, batch.attention_mask)
    keep = ref["attention_mask"].bool()
    assert torch.equal(mine["attention_mask"].bool(), keep)
    assert torch.equal(mine["input_ids"][keep], ref["input_ids"][keep])
    assert torch.equal(mine["token_type_ids"][keep], ref["token_type_ids"][keep])
    prompts = bb.native_inputs(batch.images, batch.prompt_ids, batch.prompt_attention_mask)
    alone = processor(images=[torch.zeros(3, 60, 60, dtype=torch.uint8)], text=["<image>" + batch.prompts[0]],
                      return_tensors="pt")
    row = prompts["input_ids"][0][prompts["attention_mask"][0].bool()]
    assert row.tolist() == alone["input_ids"][0].tolist() and alone["token_type_ids"].sum() == 0


def test_pixel2seq_with_the_paligemma_codec_trains_in_its_frame(folder):
    built = build(recipe_from_dict(_recipe(folder, _pixel2seq())))
    batch = next(iter(built.datamodule.train_dataloader()))
    geo = batch.transforms[0]
    assert geo.original_size == (60, 60) and geo.input_size == (32, 32)
    tok = built.backbone.tokenizer
    assert tok.unk_token_id not in batch.input_ids[batch.labels != -100].tolist()
    losses = train_steps(built.model, batch, 12)
    assert losses[-1] < 0.8 * losses[0], losses
    built.model.eval()
    preds = built.model.predict(batch)
    assert len(preds) == 8 and all(p.image_size == (32, 32) for p in preds)
    back = geo.boxes_to_original(torch.tensor([[0.0, 0.0, 32.0, 32.0]]))
    assert torch.allclose(back, torch.tensor([[0.0, 0.0, 60.0, 60.0]]))


def test_heatmap_builds_and_steps_on_a_paligemma_backbone(folder):
    paradigm = {"_base_": str(RECIPES / "paradigm" / "heatmap.yaml"), "tasks": ["rec"],
                "aligner": {"dim": 32, "depth": 1, "heads": 2}}
    built = build(recipe_from_dict(_recipe(folder, paradigm)))
    model = built.model
    assert model.feature_grid == (4, 4)
    batch = next(iter(built.datamodule.train_dataloader()))
    losses = train_steps(model, batch, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.eval()
    preds = model.predict(batch)
    assert len(preds) == 8 and all(p.boxes.shape[-1] == 4 for p in preds)


@pytest.mark.slow
def test_pixel2emb_steps_and_predicts_on_a_paligemma_backbone(folder):
    """NExT-Chat's trigger -> box head over PaliGemma: the training rows' triggers sit in the
    causal answer, prediction decodes them through the shared loop (prefix bidirectional)."""
    paradigm = {"_base_": str(RECIPES / "paradigm" / "pixel2emb.yaml"), "tasks": ["rec"], "max_new_tokens": 6}
    built = build(recipe_from_dict(_recipe(folder, paradigm)))
    batch = next(iter(built.datamodule.train_dataloader()))
    assert "<trigger>" in batch.answers[0]
    losses = train_steps(built.model, batch, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    built.model.eval()
    preds = built.model.predict(batch)
    assert len(preds) == 8 and all(p.image_size == (32, 32) for p in preds)
