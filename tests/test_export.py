"""``vlzoo export``: a self-contained folder (safetensors, resolved recipe, tokenizer, model card)
that ``vlzoo.load`` and ``vlzoo infer`` use without the run, MLflow or the stage-0 file; the
predictions and the special-token ids survive the round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import vlzoo
from support.trained import RECIPES, fit_tiny
from vlzoo.build import build
from vlzoo.cli import main
from vlzoo.config import RecipeError, instantiate, load_recipe
from vlzoo.data import ShapesDataset
from vlzoo.export import export, self_contained_recipe
from vlzoo.inference import EXPORT_MANIFEST, RECIPE_FILE, TOKENIZER_DIR, WEIGHTS_FILE
from vlzoo.runs import RECIPE_KEY

STAGE0_TOKENS = ["<stage0_a>", "<stage0_b>"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """pixel2emb (NExT-Chat) on REG and REC, started from a stage-0 backbone file that added
    tokens of its own (so the paradigm's tokens get ids after them), fitted for one step."""
    assert RECIPES is not None
    root = tmp_path_factory.mktemp("export")
    recipe = load_recipe(RECIPES / "shapes" / "pixel2emb_reg.yaml")
    backbone = instantiate(recipe.slot("backbone"), allow=recipe.allowed_prefixes, key="backbone")
    backbone.add_special_tokens(STAGE0_TOKENS)
    stage0 = root / "stage0" / "backbone.pt"
    backbone.save_backbone(stage0)
    ckpt = fit_tiny(root / "run", "shapes/pixel2emb_reg", [f"backbone.checkpoint={stage0}"])
    return {"root": root, "ckpt": ckpt, "stage0": stage0}


def _samples() -> list:
    reg = ShapesDataset(split="test", size=2, image_size=64, tasks=["reg"])[0]
    rec = ShapesDataset(split="test", size=2, image_size=64, tasks=["rec"])[1]
    return [reg, rec]


def _answers(model) -> list:
    reg, rec = _samples()
    return [model(reg.image, task="reg", box=reg.meta["prompt_boxes"][0]),
            model(rec.image, rec.targets.expressions[0], task="rec")]


@pytest.mark.slow
def test_export_reloads_alone_with_the_same_answers_and_token_ids(run: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    original = vlzoo.load(run["ckpt"])
    before = _answers(original)
    folder = tmp_path / "hub" / "pixel2emb-reg"
    assert main(["export", str(run["ckpt"]), str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", EXPORT_MANIFEST, RECIPE_FILE, TOKENIZER_DIR, WEIGHTS_FILE])
    assert not [p for p in folder.rglob("*") if p.suffix in (".pt", ".ckpt", ".bin", ".pkl")]  # nothing to unpickle
    # the stage-0 file, the run and its MLflow store are gone: the export alone must do
    shutil.rmtree(run["stage0"].parent)
    with pytest.raises(RecipeError, match="backbone.checkpoint names .* no longer exists.*vlzoo export"):
        vlzoo.load(run["ckpt"])  # the checkpoint itself needs it (it fixes the ids of the tokens it added)
    moved = tmp_path / "elsewhere"
    shutil.move(str(folder), str(moved))
    reloaded = vlzoo.load(moved)
    after = _answers(reloaded)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and a.text == b.text
    assert reloaded.special_token_ids == original.special_token_ids
    tokenizer, own = reloaded.model.backbone.tokenizer, original.model.backbone.tokenizer
    for token in [*STAGE0_TOKENS, *original.special_token_ids]:
        assert tokenizer.convert_tokens_to_ids(token) == own.convert_tokens_to_ids(token)
    assert min(original.special_token_ids.values()) > max(own.convert_tokens_to_ids(t) for t in STAGE0_TOKENS)
    # the recipe rebuilds the architecture only; every weight is in the safetensors file
    recipe = yaml.safe_load((moved / RECIPE_FILE).read_text())
    assert recipe["backbone"]["checkpoint"] is None and recipe["backbone"]["language"]["tokenizer"] == TOKENIZER_DIR
    with safe_open(str(moved / WEIGHTS_FILE), framework="pt") as weights:
        assert any(k.startswith("backbone.") for k in weights.keys())
    manifest = json.loads((moved / EXPORT_MANIFEST).read_text())
    assert manifest["tasks"] == ["reg", "rec"] and manifest["special_token_ids"] == original.special_token_ids
    assert any(c.startswith("backbone.checkpoint") for c in manifest["changed"])
    card = (moved / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vlzoo") and "| global step | 1 |" in card and "val/loss" in card
    # the command line reads the folder too, and gives what the API gives
    reg = _samples()[0]
    image = tmp_path / "reg.png"
    from PIL import Image

    Image.fromarray(reg.image.permute(1, 2, 0).numpy()).save(image)
    box = ",".join(str(v) for v in reg.meta["prompt_boxes"][0])
    capsys.readouterr()
    assert main(["infer", str(moved), str(image), "--task", "reg", "--box", box]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["text"] == after[0].text and answer["box"] == [float(v) for v in reg.meta["prompt_boxes"][0]]
    # an existing folder is not overwritten by accident
    assert main(["export", str(run["ckpt"]), str(moved)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrained_language_model_is_exported_as_its_config(tmp_path: Path) -> None:
    """A recipe naming a language model folder (``name_or_path``) exports its config instead:
    the folder is not needed to load the export."""
    assert RECIPES is not None
    lm = instantiate(load_recipe(RECIPES / "shapes" / "pixel2seq_rec.yaml").get("backbone.language"),
                     allow=("vlzoo",), key="backbone.language")
    pretrained = tmp_path / "lm"
    lm.save_pretrained(pretrained)
    overrides = [f"backbone.language.name_or_path={pretrained}", "backbone.language.config=null",
                 "backbone.language.tokenizer=null", "data.train.size=2", "data.val.size=2", "data.test.size=2"]
    built = build(RECIPES / "shapes" / "pixel2seq_rec.yaml", overrides=overrides, with_data=False,
                        with_trainer=False)
    data, paths, changes = self_contained_recipe(built.recipe, built.model)
    language = data["backbone"]["language"]
    assert language["name_or_path"] is None and language["config"]["model_type"] == "llama"
    assert language["config"]["vocab_size"] == built.model.backbone.language.vocab_size
    assert paths == {"backbone.language.tokenizer": TOKENIZER_DIR} and any("name_or_path" in c for c in changes)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": built.model.state_dict(), RECIPE_KEY: built.recipe.to_yaml()}, ckpt)
    folder = export(ckpt, tmp_path / "export")
    shutil.rmtree(pretrained)
    reloaded = vlzoo.load(folder)
    for key, value in built.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key
    assert reloaded.special_token_ids == built.model.special_token_ids
