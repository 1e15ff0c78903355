"""pixel2emb recipes: every file validates; the tiny Shapes ones build with vlzoo.build and run
a few real Lightning steps (fit, then test with the evaluator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlzoo import config
from vlzoo.build import build

ROOT = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted([*ROOT.glob("shapes/pixel2emb_*.yaml"), *ROOT.glob("gpu/pixel2emb_*.yaml")])
TINY = [
    "data.train.size=8",
    "data.val.size=4",
    "data.test.size=4",
    "data.batch_size=4",
    "data.eval_batch_size=4",
]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path):
    assert path.read_text().startswith("# ")
    config.validate(config.load_recipe(path))


@pytest.mark.parametrize("name", ["pixel2emb_rec", "pixel2emb_lisa_res"])
def test_tiny_recipe_builds_and_runs(name, tmp_path):
    import lightning as L

    built = build(ROOT / "shapes" / f"{name}.yaml", overrides=TINY, with_trainer=False, with_logger=False)
    model = built.model
    assert model.backbone.hidden_size == 64
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, limit_test_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=built.datamodule)
    results = trainer.test(model, datamodule=built.datamodule, verbose=False)[0]
    key = "test/rec/acc_0.5" if name.endswith("rec") else "test/res/ciou"
    assert key in results
