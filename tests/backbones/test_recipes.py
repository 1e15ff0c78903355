"""recipes/backbone: every file validates against the signatures; the tiny ones build and run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlzoo import config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "backbone").glob("*.yaml"))


def _recipe(path: Path) -> config.Recipe:
    slot = "backbone"
    node: dict = {"_base_": str(path)}
    if "decoder" in path.stem:  # a decoder node, validated where paradigms put it
        slot, node = "paradigm", {"_target_": "vlzoo.decoders.SamMaskDecoder", "_base_": str(path)}
    return config.recipe_from_dict({slot: node})


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_without_building(path):
    assert path.read_text().startswith("# ")
    config.validate(_recipe(path))


@pytest.mark.parametrize("name", ["tiny", "tiny_sam"])
def test_tiny_recipe_builds_and_runs(name):
    pytest.importorskip("vlzoo.data.tokenizer")
    recipe = _recipe(Path(RECIPES[0]).parent / f"{name}.yaml")
    bb = config.instantiate(recipe.data["backbone"])
    assert bb.hidden_size == 64 and bb.input_size == 64 and bb.feature_grid == (8, 8)
    tok = bb.tokenizer
    ids = torch.tensor([[tok.bos_token_id, bb.image_token_id] + tok.convert_tokens_to_ids(["red", "circle"])])
    out = bb(torch.randn(1, 3, 64, 64), ids, torch.ones_like(ids), labels=ids)
    assert out.hidden_states.shape == (1, 3 + 64, 64) and torch.isfinite(out.loss)
