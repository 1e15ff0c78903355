"""The shipped heatmap recipes build through vlzoo.build and train a few Lightning steps."""

from __future__ import annotations

import pytest

from vlzoo.paradigms.heatmap import HeatmapMatching


@pytest.mark.parametrize("task", ["rec", "det", "seg", "pose", "res"])
def test_tiny_recipe_builds_and_runs_with_lightning(task, tmp_path):
    from vlzoo.build import build
    from vlzoo.config import load_recipe

    overrides = [
        "backbone.vision.img_size=32",
        "data.train.size=8",
        "data.train.image_size=32",
        "data.val.size=4",
        "data.val.image_size=32",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    recipe = load_recipe(f"recipes/shapes/heatmap_{task}.yaml", overrides=overrides)
    built = build(recipe, with_logger=False, output_dir=tmp_path)
    assert isinstance(built.model, HeatmapMatching)
    vocab = built.backbone.tokenizer.get_vocab()
    assert "[LOC]" in vocab and f"[{task.upper()}]" in vocab
    built.trainer.fit(built.model, datamodule=built.datamodule)
    metrics = built.trainer.callback_metrics
    assert "train/loss_heatmap" in metrics
    key = {"rec": "acc_0.5", "det": "map_50", "seg": "map_50", "pose": "ap50", "res": "ciou"}[task]
    assert f"val/{task}/{key}" in metrics
    assert float(metrics[f"val/{task}/parse_fail_rate"]) == 0.0
