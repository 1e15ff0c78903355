"""The `vlzoo` command line: print, check, recipes, user errors, predict with overlays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from pycocotools import mask as mask_utils

from vlzoo.cli import list_recipes, main
from vlzoo.config import RecipeError, shipped_recipes_dir
from vlzoo.predictions import predictions_to_coco
from vlzoo.structures import Predictions, Targets
from vlzoo.visualize import draw_overlay

SUPPORT = Path(__file__).parent / "support" / "recipes"
TINY = SUPPORT / "tiny.yaml"


def test_print_shows_values_and_where_they_were_set(capsys: pytest.CaptureFixture) -> None:
    assert main(["print", str(TINY), "paradigm=heavy", "trainer.max_epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "max_epochs: 3  # override trainer.max_epochs=3" in out
    assert "box_loss_weight: 5.0  # slot swap paradigm=heavy" in out
    assert f"accelerator: cpu  # {SUPPORT / 'trainer' / 'quick.yaml'}" in out
    assert main(["print", str(TINY), "--plain"]) == 0
    assert "#" not in capsys.readouterr().out


def test_check_validates_and_reports_typos_without_traceback(capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(TINY)]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    assert main(["check", str(TINY), "paradigm.box_loss_weigth=2"]) == 2
    err = capsys.readouterr().err
    assert "paradigm.box_loss_weigth" in err and "Did you mean box_loss_weight?" in err
    assert "Traceback" not in err and "--debug" in err
    with pytest.raises(RecipeError):
        main(["check", str(TINY), "paradigm.box_loss_weigth=2", "--debug"])


def test_check_refuses_dangerous_targets(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("trainer:\n  _target_: os.system\n  command: touch hacked\n")
    for verb in ("check", "fit"):
        assert main([verb, str(evil), "--output-dir", str(tmp_path)] if verb == "fit" else [verb, str(evil)]) == 2
        assert "os.system is not allowed" in capsys.readouterr().err
    assert main(["check", str(TINY), "trainer._target_=builtins.eval"]) == 2
    assert "builtins.eval is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "hacked").exists() and not Path("hacked").exists()


def test_allow_target_flag_is_needed_and_recorded(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("paradigm: {_target_: support.tiny.TinyParadigm}\n")
    assert main(["check", str(recipe)]) == 2
    assert "--allow-target" in capsys.readouterr().err
    assert main(["print", str(recipe), "--allow-target", "support"]) == 0
    assert "- support  # --allow-target support" in capsys.readouterr().out


def test_recipes_lists_shipped_recipes_with_descriptions(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "trainer/cpu" in out and "optimizer/adamw" in out
    names = dict(list_recipes(shipped_recipes_dir()))
    assert names["trainer/cpu"].startswith("Lightning Trainer on CPU")
    assert dict(list_recipes(SUPPORT))["tiny"].startswith("A tiny box regressor")


def test_missing_recipe_and_missing_data_slot(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["fit", str(SUPPORT / "nobackbone.yaml"), "--output-dir", str(tmp_path)]) == 2
    assert "needs a 'data' slot" in capsys.readouterr().err


def test_predict_writes_coco_results_and_overlays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    output, overlays = tmp_path / "preds.json", tmp_path / "overlays"
    argv = ["predict", str(TINY), "--output-dir", str(tmp_path), "--output", str(output), "--overlays", str(overlays),
            "--max-overlays", "3", "--tracking-uri", f"sqlite:///{tmp_path / 'elsewhere.db'}"]
    assert main(argv) == 0
    assert (tmp_path / "elsewhere.db").is_file() and not (tmp_path / "mlflow.db").exists()
    records = json.loads(output.read_text())
    assert len(records) == 8 and {r["image_id"] for r in records} == set(range(8))
    first = records[0]
    x, y, w, h = first["bbox"]
    assert all(isinstance(v, float) for v in (x, y, w, h)) and first["task"] == "rec" and first["text"] == "a square"
    assert first["keypoints"] == [2.0, 3.0, 1.0]
    rle = first["segmentation"]
    assert mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).shape == (16, 16)
    pngs = sorted(overlays.glob("*.png"))
    assert len(pngs) == 3
    assert imread(pngs[0]).ndim == 3


def test_predictions_to_coco_converts_units_and_text_only() -> None:
    mask = torch.zeros(1, 10, 20, dtype=torch.bool)
    mask[0, 2:5, 3:9] = True
    pred = Predictions(boxes=torch.tensor([[3.0, 2.0, 9.0, 5.0]]), scores=torch.tensor([0.5]), labels=torch.tensor([4]),
                       masks=mask, image_id=11, image_size=(10, 20))
    (record,) = predictions_to_coco(pred, task="res")
    assert record["bbox"] == [3.0, 2.0, 6.0, 3.0] and record["score"] == 0.5 and record["category_id"] == 4
    decoded = mask_utils.decode({"size": record["segmentation"]["size"], "counts": record["segmentation"]["counts"].encode()})
    assert decoded.sum() == 18 and decoded.shape == (10, 20)
    text_only = predictions_to_coco(Predictions(text="a cat", parsed=False, image_id=3), task="caption")
    assert text_only == [{"image_id": 3, "text": "a cat", "parsed": False, "task": "caption"}]


def test_draw_overlay_draws_truth_prediction_and_evidence(tmp_path: Path) -> None:
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    truth = Targets(boxes=torch.tensor([[4.0, 4.0, 30.0, 30.0]]), image_size=(64, 64))
    pred = Predictions(boxes=torch.tensor([[34.0, 34.0, 60.0, 60.0]]), scores=torch.ones(1), image_size=(64, 64))
    plain = imread(draw_overlay(image, truth, pred, tmp_path / "plain.png"))[..., :3]
    # prediction red in the lower right quadrant, truth green in the upper left
    lower, upper = plain[plain.shape[0] // 2 :, plain.shape[1] // 2 :], plain[: plain.shape[0] // 2, : plain.shape[1] // 2]
    assert ((lower[..., 0] > 0.8) & (lower[..., 1] < 0.3)).any()
    assert ((upper[..., 1] > 0.8) & (upper[..., 0] < 0.3)).any()
    assert not ((upper[..., 0] > 0.8) & (upper[..., 1] < 0.3)).any()
    heat = torch.zeros(8, 8)
    heat[:4, :4] = 1.0
    with_evidence = pred.replace(evidence={"heatmap": heat, "points": torch.tensor([[10.0, 50.0]])})
    drawn = imread(draw_overlay(image, truth, with_evidence, tmp_path / "evidence.png", title="rec: thing"))[..., :3]
    assert drawn.shape[0] > plain.shape[0]  # room for the title
    assert (drawn != imread(tmp_path / "evidence.png")[..., :3]).sum() == 0
    assert drawn[: drawn.shape[0] // 2, : drawn.shape[1] // 2].mean() > upper.mean()  # heatmap over the top left
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        draw_overlay(torch.zeros(64, 64, dtype=torch.uint8), truth, pred, tmp_path / "bad.png")
