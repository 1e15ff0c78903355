"""A referring sample keeps its task: an unreferable scene is redrawn, never turned into a caption."""

from __future__ import annotations

import pytest

from vlzoo.data import ShapesDataset
from vlzoo.data.errors import DataError


def test_unreferable_scene_is_redrawn_deterministically(monkeypatch):
    ds = ShapesDataset(split="train", size=4, tasks=["rec"])
    real = ShapesDataset._reference
    calls = {"n": 0}

    def first_fails(scene, focus, rng, kinds):
        calls["n"] += 1
        return None if calls["n"] == 1 else real(scene, focus, rng, kinds)

    monkeypatch.setattr(ShapesDataset, "_reference", staticmethod(first_fails))
    sample = ds[2]
    assert sample.task == "rec" and len(sample.targets) == 1
    calls["n"] = 0
    again = ds[2]
    assert again.prompt == sample.prompt and (again.image == sample.image).all()
    calls["n"] = 0
    assert ds.scene(2).objects[sample.meta["object_ids"][0]].box == pytest.approx(sample.targets.boxes[0].tolist())


def test_never_referable_is_a_clear_error(monkeypatch):
    ds = ShapesDataset(split="val", size=4, tasks=["res"])
    monkeypatch.setattr(ShapesDataset, "_reference", staticmethod(lambda scene, focus, rng, kinds: None))
    with pytest.raises(DataError, match=r"ShapesDataset\(val\) item 3: no object could be referred to"):
        ds[3]
