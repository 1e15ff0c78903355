"""Paradigms on the Qwen backbones through recipes: pixel2seq with the family's codec trains on
Shapes in Qwen's own frame (60 px images smart-resized to 64 px), heatmap builds and steps."""

from __future__ import annotations

import pytest
import torch

from vlzoo.build import build
from vlzoo.config import recipe_from_dict
from vlzoo.data.smart_resize import SmartResizeTransform

from .native_recipes import RECIPES, shapes_recipe, train_steps
from .qwen_tiny import TINY_TEMPLATE, make_qwen_folder

TARGETS = {"qwen2_vl": "vlzoo.backbones.Qwen2VLBackbone", "qwen2_5_vl": "vlzoo.backbones.Qwen25VLBackbone"}
CODECS = {"qwen2_vl": "Qwen2VLCodec", "qwen2_5_vl": "Qwen25VLCodec"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {f: make_qwen_folder(tmp_path_factory.mktemp(f), f) for f in TARGETS}


def _recipe(folder: str, family: str, paradigm: dict) -> dict:
    backbone = {"_target_": TARGETS[family], "name_or_path": folder, "image_size": 60}
    return shapes_recipe(backbone, paradigm, TINY_TEMPLATE)




@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TARGETS))
def test_pixel2seq_with_the_family_codec_trains_in_qwens_frame(folders, family):
    paradigm = {"_base_": str(RECIPES / "paradigm" / "pixel2seq.yaml"), "tasks": ["rec"], "max_new_tokens": 24,
                "coordinate_sigma": 0.0, "codec": {"_target_": f"vlzoo.paradigms.codecs.{CODECS[family]}"}}
    built = build(recipe_from_dict(_recipe(folders[family], family, paradigm)))
    dm = built.datamodule
    assert isinstance(dm.transform, SmartResizeTransform)  # the backbone's frame, injected
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[-2:] == (64, 64)  # 60 px Shapes images in Qwen's frame (multiples of 8)
    geo = batch.transforms[0]
    assert geo.original_size == (60, 60) and geo.input_size == (64, 64) and geo.offset == (0.0, 0.0)
    answer = batch.answers[0]
    assert answer.startswith("<|box_start|>(") and answer.endswith(")<|box_end|>")
    if family == "qwen2_5_vl":  # absolute pixels of the 64 px input
        box = geo.boxes_to_input(batch.original_targets[0].boxes[:1]).round().long()[0].tolist()
        assert answer == f"<|box_start|>({box[0]},{box[1]}),({box[2]},{box[3]})<|box_end|>"
    tok = built.backbone.tokenizer
    assert tok.unk_token_id not in batch.input_ids[batch.labels != -100].tolist()
    losses = train_steps(built.model, batch, 12)
    assert losses[-1] < 0.8 * losses[0], losses
    built.model.eval()
    preds = built.model.predict(batch)
    assert len(preds) == 8 and all(p.image_size == (64, 64) for p in preds)
    # predictions come back to original pixels through the smart_resize map
    back = geo.boxes_to_original(torch.tensor([[0.0, 0.0, 64.0, 64.0]]))
    assert torch.allclose(back, torch.tensor([[0.0, 0.0, 60.0, 60.0]]))


@pytest.mark.slow
def test_heatmap_builds_and_steps_on_a_qwen_backbone(folders):
    paradigm = {"_base_": str(RECIPES / "paradigm" / "heatmap.yaml"), "tasks": ["rec"],
                "aligner": {"dim": 32, "depth": 1, "heads": 2}}
    built = build(recipe_from_dict(_recipe(folders["qwen2_5_vl"], "qwen2_5_vl", paradigm)))
    model = built.model
    assert model.feature_grid == (8, 8)  # the merged grid of the fixed 60 -> 64 px frame
    batch = next(iter(built.datamodule.train_dataloader()))
    losses = train_steps(model, batch, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.eval()
    preds = model.predict(batch)
    assert len(preds) == 8 and all(p.boxes.shape[-1] == 4 for p in preds)


def test_pixel2seq_builds_on_a_variable_grid_and_heatmap_says_why_not(folders):
    """Without backbone.image_size the grid varies per image: pixel2seq (which never reads it)
    builds; heatmap, whose aligner needs a fixed grid, stops with the setting to give."""
    from vlzoo.backbones import Qwen2VLBackbone
    from vlzoo.backbones.qwen2vl import VariableGridError
    from vlzoo.paradigms import HeatmapMatching, Pixel2Seq
    from vlzoo.paradigms.codecs import Qwen2VLCodec

    bb = Qwen2VLBackbone(name_or_path=folders["qwen2_vl"])
    model = Pixel2Seq(backbone=bb, codec=Qwen2VLCodec(), tasks=["rec"])
    assert model.backbone is bb
    with pytest.raises(VariableGridError, match="backbone.image_size"):
        HeatmapMatching(backbone=bb, tasks=["rec"])
