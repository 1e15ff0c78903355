"""The analysis scripts that docs/results.md cites run on a real (tiny) checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from support.trained import fit_tiny
from vlzoo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_rec_by_kind_on_a_trained_checkpoint(tmp_path):
    argv = ["fit", str(ROOT / "recipes" / "shapes" / "heatmap_rec.yaml"), "trainer=smoke", "data.train.size=32",
            "data.val.size=8", "data.test.size=24", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    rows = _script("rec_by_kind").rec_by_kind(str(checkpoint), size=24)
    assert rows["all"]["n"] == 24 == sum(r["n"] for k, r in rows.items() if k != "all")
    assert set(rows) - {"all"} <= {"attribute", "ordinal", "superlative", "relation"}
    for row in rows.values():
        # a box whose IoU with the target is >= 0.5 has its centre inside the target
        assert 0.0 <= row["acc_0.5"] <= row["centre_in_target"] <= 1.0
        assert 0.0 < row["random_object"] <= 1.0  # the target is one of the scene's objects


@pytest.mark.slow
def test_rec_from_the_masks_of_a_res_checkpoint(tmp_path, monkeypatch):
    """``boxes="masks"``: a RES model scored on REC with its masks' boxes (LISA's REC); on a
    stub that predicts the target's own mask, every sample is a hit."""
    checkpoint = fit_tiny(tmp_path, "shapes/heatmap_res", ["data.train.size=16", "data.test.size=12"])
    script = _script("rec_by_kind")
    rows = script.rec_by_kind(str(checkpoint), size=12, boxes="masks")
    assert rows["all"]["n"] == 12
    for row in rows.values():
        assert 0.0 <= row["acc_0.5"] <= row["centre_in_target"] <= 1.0
    with pytest.raises(ValueError, match="boxes must be"):
        script.rec_by_kind(str(checkpoint), boxes="mask")

    from vlzoo.checkpoints import load_checkpoint

    class Oracle:  # the target's mask as the prediction: the boxes read from it are the target's
        def __init__(self, model):
            self.model = model

        def predict(self, batch):
            preds = self.model.predict(batch)  # in network-input pixels, as batch.targets
            return [p.replace(masks=batch.targets[i].masks[:1].bool()) for i, p in enumerate(preds)]

    import vlzoo.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path: Oracle(load_checkpoint(path)))
    oracle = script.rec_by_kind(str(checkpoint), size=12, boxes="masks")
    assert oracle["all"]["acc_0.5"] == 1.0 == oracle["all"]["centre_in_target"]


@pytest.mark.slow
def test_trigger_attention_on_a_trained_checkpoint(tmp_path):
    argv = ["fit", str(ROOT / "recipes" / "shapes" / "pixel2emb_rec.yaml"), "trainer=smoke", "data.train.size=32",
            "data.val.size=8", "data.test.size=12", "data.train.tasks=[rec]", "data.val.tasks=[rec]",
            "data.test.tasks=[rec]", "paradigm.tasks=[rec]", "evaluator.tasks=[rec]", "paradigm.attention_target=lmm",
            "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    checkpoint = str(next(tmp_path.rglob("last.ckpt")))
    script = _script("trigger_attention")
    row = script.trigger_attention(checkpoint, size=12)
    assert row["n"] == 12 and row["source"] == "lmm"  # the attention the model's option supervised
    for key in ("on_objects", "target_share", "picks_target"):
        assert 0.0 <= row[key] <= 1.0
    assert 0.0 < row["chance"] <= 1.0 / 2  # Shapes REC scenes hold two or more objects
    cross = script.trigger_attention(checkpoint, source="cross", size=12)
    assert cross["source"] == "cross" and cross["chance"] == row["chance"]  # the same samples
    assert cross["on_objects"] != row["on_objects"]  # a different attention


def test_vqa_by_kind_baselines_equal_a_direct_count():
    """The random-object figure of each referred kind is the share of the scene's objects for
    which the question has the reference answer, counted here by hand on known scenes."""
    from vlzoo.data import ShapesDataset

    script = _script("vqa_by_kind")
    dataset = ShapesDataset(split="test", size=60, image_size=64, tasks=["vqa"])
    seen = set()
    for i in range(60):
        item = dataset[i]
        kind, scene = item.meta["vqa_kind"], dataset.scene(i)
        value = script._random_object(kind, item.prompt, item.answer, scene)
        if kind not in script.REFERRED_KINDS:
            assert value is None
            continue
        seen.add(kind)
        h, w = scene.size
        agree = 0
        for o in scene.objects:
            if kind == "colour":
                agree += o.colour_name == item.answer
            elif kind == "shape":
                agree += o.category_name == item.answer
            else:
                side = item.prompt.rsplit(" in the ", 1)[1].split()[0]
                on = {"left": o.cx < w / 2, "right": o.cx >= w / 2, "top": o.cy < h / 2, "bottom": o.cy >= h / 2}[side]
                agree += ("yes" if on else "no") == item.answer
        assert value == agree / len(scene.objects)
        assert value > 0  # the referred object itself has the answer
    assert seen == set(script.REFERRED_KINDS)


@pytest.mark.slow
def test_vqa_by_kind_on_a_stage0_checkpoint(tmp_path):
    checkpoint = fit_tiny(tmp_path, "shapes/base_lmm", ["data.train.size=32"])
    rows = _script("vqa_by_kind").vqa_by_kind(str(checkpoint), size=40)
    assert rows["all"]["n"] == 40 == sum(r["n"] for k, r in rows.items() if k != "all")
    for kind, row in rows.items():
        assert 0.0 <= row["exact_match"] <= 1.0 and 0.0 < row["best_constant"] <= 1.0
        if kind in ("colour", "shape", "position"):
            assert 0.0 < row["random_object"] <= 1.0
