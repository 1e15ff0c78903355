"""``vlzoo infer`` and ``vlzoo.load``: one image in, the answer ``vlzoo predict`` gives for the
same sample out, in the image's own pixels; any image PIL reads, folders and globs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import vlzoo
from support.trained import fit_tiny
from vlzoo.cli import main
from vlzoo.data import ShapesDataset
from vlzoo.data.templates import instruction
from vlzoo.inference import TrainedModel, image_files, read_image

pytestmark = pytest.mark.slow
TASKS = "[res,rec]"
PREDICT = "{_target_: vlzoo.data.ShapesDataset, split: test, size: 20, image_size: 64, tasks: [res, rec]}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """heatmap (Lumen) with a SAM mask decoder trained for one step on RES and REC: boxes, masks
    and a heatmap peak in every answer."""
    overrides = [f"paradigm.tasks={TASKS}", f"evaluator.tasks={TASKS}", f"data.train.tasks={TASKS}",
                 f"data.val.tasks={TASKS}", f"data.test.tasks={TASKS}"]
    return fit_tiny(tmp_path_factory.mktemp("heatmap"), "shapes/heatmap_res", overrides, steps=2)


@pytest.fixture(scope="module")
def model(ckpt: Path) -> TrainedModel:
    return vlzoo.load(ckpt)


def _png(image: torch.Tensor, path: Path) -> Path:
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


def _infer(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    capsys.readouterr()
    assert main(["infer", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_infer_gives_the_answer_predict_gives(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "predictions.json"
    argv = ["predict", "--checkpoint", str(ckpt), f"data.predict={PREDICT}", "data.eval_batch_size=1",
            "trainer.limit_predict_batches=20", "--output", str(output), "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    records = {r["image_id"]: r for r in json.loads(output.read_text())}
    dataset = ShapesDataset(split="test", size=20, image_size=64, tasks=["res", "rec"], seed=0)
    compared = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        expression = sample.targets.expressions[0]
        if sample.task in compared or sample.prompt != instruction(sample.task, expr=expression):
            continue  # phrased with another of the task's templates (not what infer writes), or done
        png = _png(sample.image, tmp_path / f"{index}.png")
        answer = _infer(capsys, str(ckpt), str(png), expression, "--task", sample.task)
        record = records[index]
        assert answer["task"] == record["task"] == sample.task and answer["prompt"] == sample.prompt
        x1, y1, x2, y2 = answer["boxes"][0]
        assert [x1, y1, x2 - x1, y2 - y1] == pytest.approx(record["bbox"], abs=1e-3)
        assert answer["scores"][0] == pytest.approx(record["score"], abs=1e-4)
        if sample.task == "res":
            assert answer["masks"][0] == record["segmentation"]  # COCO RLE, the same mask
        else:
            assert "masks" not in answer and "segmentation" not in record
        assert set(answer["evidence"]["heatmap_peak"]) == {"x", "y", "value", "grid"}
        compared.add(sample.task)
    assert compared == {"res", "rec"}


def test_load_takes_paths_pil_images_arrays_and_lists(model: TrainedModel, tmp_path: Path) -> None:
    a, b = (ShapesDataset(split="val", size=4, image_size=64, tasks=["rec"])[i] for i in (0, 1))
    path = _png(a.image, tmp_path / "a.png")
    reference = model(path, "the red circle", task="rec")
    assert reference.image_size == (64, 64) and reference.masks is None and len(reference) == 1
    as_pil = Image.open(path)
    as_array = np.asarray(as_pil)
    for other in (as_pil, as_array, as_array.astype(np.float32) / 255.0, a.image):
        pred = model(other, "the red circle", task="rec")
        assert torch.equal(pred.boxes, reference.boxes) and torch.equal(pred.scores, reference.scores)
    # a list answers a list, in the order given; one expression serves every image
    both = model([path, b.image], "the red circle", task=["rec", "res"])
    assert isinstance(both, list) and len(both) == 2
    torch.testing.assert_close(both[0].boxes, reference.boxes, atol=1e-4, rtol=0)
    assert both[1].masks is not None and both[1].masks.shape == (1, 64, 64)
    single = model(b.image, "the red circle", task="res")
    torch.testing.assert_close(both[1].boxes, single.boxes, atol=1e-4, rtol=0)
    assert model.tasks == ["res", "rec"] and set(model.special_token_ids) >= {"[LOC]", "[REC]", "[RES]"}


def test_infer_any_size_folders_globs_and_overlays(ckpt: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    sample = ShapesDataset(split="val", size=2, image_size=64, tasks=["res"])[1]
    folder = tmp_path / "images"
    folder.mkdir()
    wide = Image.fromarray(sample.image.permute(1, 2, 0).numpy()).resize((150, 90))
    wide.save(folder / "wide.jpg", quality=95)
    Image.fromarray(sample.image.permute(1, 2, 0).numpy()).convert("L").save(folder / "grey.bmp")
    (folder / "notes.txt").write_text("not an image")
    one = _infer(capsys, str(ckpt), str(folder / "wide.jpg"), "the blue shape", "--task", "res",
                 "--overlay", str(tmp_path / "wide.png"))
    assert one["image_size"] == [90, 150] and (tmp_path / "wide.png").is_file()
    x1, y1, x2, y2 = one["boxes"][0]
    assert 0 <= x1 <= x2 <= 150 and 0 <= y1 <= y2 <= 90
    rle = one["masks"][0]
    assert mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).shape == (90, 150)
    peak = one["evidence"]["heatmap_peak"]
    assert 0 <= peak["x"] <= 150 and 0 <= peak["y"] <= 90  # the heatmap's peak in the image's pixels
    several = _infer(capsys, str(ckpt), str(folder), "the blue shape", "--task", "res", "--overlay", str(tmp_path / "ov"))
    assert [Path(r["image"]).name for r in several] == ["grey.bmp", "wide.jpg"]
    assert several[1]["boxes"] == one["boxes"] and several[0]["image_size"] == [64, 64]
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["grey.png", "wide.png"]
    matched = _infer(capsys, str(ckpt), str(folder / "*.jpg"), "the blue shape", "--task", "res")
    assert isinstance(matched, list) and [Path(r["image"]).name for r in matched] == ["wide.jpg"]
    assert image_files(folder) == [folder / "grey.bmp", folder / "wide.jpg"]
    assert read_image(folder / "grey.bmp").shape == (3, 64, 64)


@pytest.mark.parametrize(
    "extra, says",
    [
        (["the red circle", "--task", "det"], ["does not do task 'det'", "trained for ['res', 'rec']"]),
        ([], ["task 'res' needs an expression"]),
        (["the red circle", "--box", "1,2,3"], ["--box '1,2,3'", "four numbers"]),
    ],
)
def test_infer_bad_input_is_one_clear_line(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           extra: list[str], says: list[str]) -> None:
    image = _png(ShapesDataset(split="val", size=1, image_size=64)[0].image, tmp_path / "x.png")
    assert main(["infer", str(ckpt), str(image), *extra]) == 2
    err = capsys.readouterr().err
    assert all(s in err for s in says), err
    assert "Traceback" not in err


def test_infer_names_a_file_that_is_not_an_image(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert main(["infer", str(ckpt), str(bad), "the red circle"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "cannot read image" in err
    assert main(["infer", str(tmp_path / "nothing-here"), str(bad), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predictions_to_json_maps_evidence_to_the_image_pixels() -> None:
    from vlzoo.data.transforms import ResizeTransform
    from vlzoo.inference import json_text, predictions_to_json
    from vlzoo.structures import Predictions

    geo = ResizeTransform(size=64).geometry((40, 80))  # a wide image padded to a square, halved
    heat = torch.zeros(16, 16)
    heat[10, 4] = 0.9  # cell centre (4.5, 10.5) of 16 -> input pixels (18, 42)
    mask = torch.zeros(1, 40, 80, dtype=torch.bool)
    mask[0, 5:9, 10:30] = True
    pred = Predictions(boxes=torch.tensor([[10.0, 5.0, 30.0, 9.0]]), scores=torch.tensor([0.5]),
                       labels=torch.tensor([2]), masks=mask, keypoints=torch.tensor([[[1.0, 2.0, 0.7]]]),
                       text="a cross", image_size=(40, 80),
                       evidence={"heatmap": heat, "points": torch.tensor([[18.0, 42.0]])})
    out = predictions_to_json(pred, task="res", prompt="segment the cross.", transform=geo)
    assert out["boxes"] == [[10.0, 5.0, 30.0, 9.0]] and out["labels"] == [2] and out["text"] == "a cross"
    assert mask_utils.decode({"size": out["masks"][0]["size"], "counts": out["masks"][0]["counts"].encode()}).sum() == 80
    assert out["keypoints"] == [[[1.0, 2.0, 0.7]]]
    peak = out["evidence"]["heatmap_peak"]
    # input = original * 0.8 + (0, 16): (18, 42) in the input is (22.5, 32.5) in the image
    assert (peak["x"], peak["y"], peak["value"], peak["grid"]) == (22.5, 32.5, pytest.approx(0.9), [16, 16])
    assert out["evidence"]["points"] == [[22.5, 32.5]]
    assert json.loads(json_text(out)) == out


def test_demo_without_gradio_says_how_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 ckpt: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the [demo] extra were not installed
    assert main(["demo", str(ckpt)]) == 2
    assert "pip install -e '.[demo]'" in capsys.readouterr().err


def test_load_asks_consent_for_the_targets_a_checkpoint_allows(tmp_path: Path) -> None:
    from vlzoo.callbacks import RECIPE_KEY
    from vlzoo.config import RecipeError, load_recipe

    recipe = load_recipe(Path(__file__).parent / "support" / "recipes" / "tiny.yaml")  # allow_targets: [support]
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {}, RECIPE_KEY: recipe.to_yaml()}, ckpt)
    with pytest.raises(RecipeError, match=r"asks to trust support.*--allow-target support"):
        vlzoo.load(ckpt)
    # with consent it is built - and its datamodule, which has no collate, is named
    with pytest.raises(RecipeError, match=r"TinyData\) has no collate\(\)"):
        vlzoo.load(ckpt, allow_targets=["support"])
