"""Every shipped recipe validates; every tiny Shapes recipe builds its model and data."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlzoo.config import SLOTS, load_recipe, recipe_from_dict, validate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FULL = sorted(p for folder in ("shapes", "gpu") for p in (RECIPES / folder).glob("*.yaml"))
SLOT_FILES = sorted(p for slot in SLOTS for p in (RECIPES / slot).glob("*.yaml"))
NODES = sorted((RECIPES / "decoders").glob("*.yaml"))


def _id(path: Path) -> str:
    return path.relative_to(RECIPES).with_suffix("").as_posix()


def test_every_recipe_starts_with_a_one_line_description():
    for path in RECIPES.rglob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 10, path


@pytest.mark.parametrize("path", FULL, ids=_id)
def test_full_recipe_validates(path):
    validate(load_recipe(path))


@pytest.mark.parametrize("path", SLOT_FILES, ids=_id)
def test_slot_recipe_validates_in_its_slot(path):
    slot = path.parent.name
    validate(recipe_from_dict({slot: {"_base_": str(path)}}))


@pytest.mark.parametrize("path", NODES, ids=_id)
def test_decoder_nodes_validate_inside_a_paradigm(path):
    recipe = recipe_from_dict({"paradigm": {"_base_": str(RECIPES / "paradigm" / "pixel2emb.yaml"),
                                            "mask_decoder": {"_base_": str(path)}}})
    validate(recipe)


@pytest.mark.parametrize("path", sorted((RECIPES / "shapes").glob("*.yaml")), ids=_id)
def test_tiny_shapes_recipe_builds(path):
    from vlzoo.build import build

    built = build(path, overrides=["data.train.size=8", "data.val.size=4"], with_trainer=False)
    assert built.model is not None and built.datamodule is not None
    loaders = built.datamodule.val_dataloader()
    batch = next(iter(loaders[0] if isinstance(loaders, list) else loaders))
    parts = built.model.loss(batch)
    assert parts and all(v.ndim == 0 for v in parts.values())
