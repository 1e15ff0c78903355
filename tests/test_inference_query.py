"""The single-image path fills the typed query as a dataset does: a det / seg / pose category
name gets its id from the training data's categories (or ``category_id=``), a REG box becomes
``Sample.prompt_boxes``; nothing goes into ``meta``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlzoo.build import build
from vlzoo.config import load_recipe, recipe_from_dict
from vlzoo.data import ShapesDataset
from vlzoo.data.export import export_shapes_coco
from vlzoo.inference import TrainedModel, recipe_categories

ROOT = Path(__file__).resolve().parents[1]


def _model(name: str, *overrides: str) -> TrainedModel:
    recipe = load_recipe(ROOT / "recipes" / "shapes" / f"{name}.yaml",
                         overrides=["backbone.vision.img_size=32", "data.num_workers=0", *overrides])
    built = build(recipe, with_trainer=False, with_logger=False)
    return TrainedModel(built.model.eval(), built.datamodule, recipe, source=Path("memory"))


def test_category_names_get_the_training_data_ids_and_labels_follow() -> None:
    model = _model("heatmap_det", "paradigm.score_threshold=-1.0")  # untrained: every peak is a box
    image = ShapesDataset(split="test", size=1, image_size=32, tasks=["det"])[0].image
    sample = model.sample(image, "square", task="det")
    assert (sample.category_id, sample.category_name, sample.meta) == (2, "square", {})
    assert model.sample(image, "hexagon", task="det", category_id=9).category_id == 9
    with pytest.raises(ValueError, match=r"category 'hexagon' has no id .*category_id="):
        model.sample(image, "hexagon", task="det")
    pred = model(image, "triangle", task="det")
    assert len(pred) > 0 and set(pred.labels.tolist()) == {3}
    assert set(model(image, "triangle", task="det", category_id=40).labels.tolist()) == {40}


def test_reg_box_is_the_prompt_box() -> None:
    model = _model("pixel2emb_reg")
    image = torch.zeros(3, 40, 20, dtype=torch.uint8)
    sample = model.sample(image, task="reg", box=[2, 3, 12, 30])
    assert sample.prompt_boxes.tolist() == [[2.0, 3.0, 12.0, 30.0]] and sample.meta == {}
    batch = model.collate([sample])
    assert torch.allclose(batch.prompt_boxes[0], batch.transforms[0].boxes_to_input(sample.prompt_boxes))


def test_recipe_categories_of_shapes_and_coco(tmp_path: Path) -> None:
    paths = export_shapes_coco(ShapesDataset(split="val", size=3, image_size=32, tasks=["det"]), tmp_path)
    coco = recipe_from_dict({"data": {"_target_": "vlzoo.data.VLDataModule", "val": {"instances": {
        "_target_": "vlzoo.data.CocoDataset", "annotation_file": str(paths["instances"]),
        "image_dir": str(paths["image_dir"])}}}})
    assert recipe_categories(coco) == {"circle": 1, "square": 2, "triangle": 3, "diamond": 4, "cross": 5}
    gone = recipe_from_dict({"data": {"_target_": "vlzoo.data.VLDataModule", "train": {
        "_target_": "vlzoo.data.CocoDataset", "annotation_file": str(tmp_path / "missing.json"), "image_dir": "x"}}})
    assert recipe_categories(gone) == {}
