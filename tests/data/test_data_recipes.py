"""Data recipes: a description line, importable targets, arguments that bind, Shapes ones build."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vlzoo.data.answers import AnswerFormat, plain_box_text


class BoxText(AnswerFormat):
    def localization_answer(self, sample, input_size):
        return " ".join(plain_box_text(b.tolist(), input_size) for b in sample.targets.boxes)


RECIPES = sorted((Path(__file__).parents[2] / "recipes" / "data").glob("*.yaml"))


def _target(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _build(node, small: bool):
    """Minimal recursive instantiation (the real one lives in vlzoo.config)."""
    if isinstance(node, dict):
        kwargs = {k: _build(v, small) for k, v in node.items() if k != "_target_"}
        if "_target_" not in node:
            return kwargs
        cls = _target(node["_target_"])
        inspect.signature(cls).bind(**kwargs)  # every argument is a real keyword
        if small and "size" in kwargs:
            kwargs["size"] = 4
        return cls(**kwargs)
    if isinstance(node, list):
        return [_build(v, small) for v in node]
    return node


def test_all_recipes_present():
    names = {p.stem for p in RECIPES}
    expected = {"shapes_rec", "shapes_res", "shapes_det", "shapes_seg", "shapes_pose", "shapes_reg", "shapes_mix", "shapes_pretrain", "coco_instances", "refcoco"}
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe(path, monkeypatch):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 10
    monkeypatch.setenv("COCO_ROOT", "/data/coco")
    monkeypatch.setenv("REASONSEG_ROOT", "/data/reasonseg")
    monkeypatch.setenv("GREFCOCO_ROOT", "/data/grefcoco")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert cfg["_target_"] == "vlzoo.data.VLDataModule"
    if path.stem.startswith("shapes"):
        cfg["num_workers"] = 0
        dm = _build(cfg, small=True)
        dm.answer_format = BoxText()  # what build would inject from a paradigm
        batch = next(iter(dm.val_dataloader() if not isinstance(dm.val_dataloader(), list) else dm.val_dataloader()[0]))
        assert len(batch) == 4
        if path.stem == "shapes_mix":
            assert dm.test_names == ["test", "comp_test"]
    else:
        # real data is absent: check the targets and that the arguments bind
        def walk(node):
            if isinstance(node, dict):
                if "_target_" in node:
                    inspect.signature(_target(node["_target_"])).bind(**{k: v for k, v in node.items() if k != "_target_" and not isinstance(v, dict)})
                for v in node.values():
                    walk(v)

        walk(cfg)
        # the data roots come from the environment (ReasonSeg ships its own images)
        assert "/data/coco/" in str(cfg) or "/data/reasonseg" in str(cfg)
        if path.stem == "grefcoco":
            assert "/data/grefcoco/grefs(unc).json" in str(cfg)
