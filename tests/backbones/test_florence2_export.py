"""A run on a Florence-2 backbone named by a folder exports self-contained: the model's config,
the tokenizer, the normalisation and the frame's side; with the folder deleted it answers the same."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

import vlzoo
from support.trained import RECIPES, SMALL
from vlzoo.cli import main
from vlzoo.config import load_recipe
from vlzoo.data import ShapesDataset
from vlzoo.export import export
from vlzoo.inference import RECIPE_FILE, TOKENIZER_DIR

from .florence_tiny import SIDE, make_florence_folder


def _answers(model) -> list:
    samples = ShapesDataset(split="test", size=2, image_size=64, tasks=["rec"])
    return [model(s.image, s.targets.expressions[0], task="rec") for s in (samples[0], samples[1])]


@pytest.mark.slow
def test_a_florence2_run_exports_self_contained(tmp_path: Path) -> None:
    pretrained = Path(make_florence_folder(tmp_path / "florence2"))
    data = load_recipe(RECIPES / "shapes" / "pixel2seq_rec.yaml").data
    data["name"] = "pixel2seq_rec_florence2"
    data["backbone"] = {"_target_": "vlzoo.backbones.Florence2Backbone", "name_or_path": str(pretrained),
                        "freeze_lm": True,
                        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    data["paradigm"]["codec"] = {"_target_": "vlzoo.paradigms.codecs.Florence2Codec"}
    data["paradigm"]["max_new_tokens"] = 8
    data["paradigm"]["coordinate_sigma"] = 0.0
    data["data"]["template"] = "{prompt}"
    recipe = tmp_path / "pixel2seq_rec_florence2.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "run"
    assert main(["fit", str(recipe), *SMALL, "trainer.max_steps=1", "--output-dir", str(out)]) == 0
    (ckpt,) = out.rglob("last.ckpt")
    original = vlzoo.load(ckpt)
    before = _answers(original)
    folder = export(ckpt, tmp_path / "export")
    shutil.rmtree(pretrained)  # the pretrained folder is gone: the export alone must do
    node = yaml.safe_load((folder / RECIPE_FILE).read_text())["backbone"]
    assert node["name_or_path"] is None and node["tokenizer"] == TOKENIZER_DIR
    assert node["config"]["model_type"] == "florence2" and node["image_size"] == SIDE
    reloaded = vlzoo.load(folder)
    for a, b in zip(before, _answers(reloaded), strict=True):
        assert a.text == b.text and torch.equal(a.boxes, b.boxes)
    assert reloaded.model.backbone.transform.geometry((60, 90)) == original.model.backbone.transform.geometry((60, 90))
    for key, value in original.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key
