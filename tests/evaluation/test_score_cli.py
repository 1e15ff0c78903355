"""`vlzoo score` end to end on tiny files: the report, the JSON, the warning, bad input named by
file and line, and vlzoo predict's records read back."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlzoo.cli import main
from vlzoo.data.frames import make_frame
from vlzoo.paradigms.codecs import Qwen25VLCodec
from vlzoo.predictions import PredictionWriter
from vlzoo.scoring.score import Reference, read_answers, reference_samples, score_answers
from vlzoo.structures import Predictions, Targets

SPLIT = ["--recipe", "shapes_rec", "--split", "val", "data.val.size=12"]


def _truth_lines() -> list[dict]:
    from vlzoo.scoring.score import load_split

    dataset, _ = load_split("shapes_rec", "val", overrides=["data.val.size=12"])
    frame, codec = make_frame("smart_resize"), Qwen25VLCodec()
    lines = []
    for ref in reference_samples(dataset):
        size = ref.target.image_size
        text = codec.encode(frame.from_original(ref.target.boxes[:1], size), frame.reference_size(size))
        lines.append({"image_id": ref.ids["image_id"], "text": text})
    return lines


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def truth() -> list[dict]:
    return _truth_lines()


def test_score_prints_the_figures_and_writes_json(tmp_path, capsys, truth):
    answers = _write(tmp_path / "answers.jsonl", truth)
    out = tmp_path / "report.json"
    assert main(["score", str(answers), *SPLIT, "--codec", "qwen2.5vl", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "frame smart_resize" in text and "acc_0.5 1.0000" in text and "WARNING" not in text
    report = json.loads(out.read_text())
    assert report["metrics"]["acc_0.5"] == 1.0 and report["samples"] == len(truth) and report["warnings"] == []
    assert report["by_frame"]["smart_resize"]["acc_0.5"] == 1.0 and report["forms"] == {"pairs": len(truth)}


def test_score_warns_when_another_frame_fits_far_better(tmp_path, capsys, truth):
    answers = _write(tmp_path / "answers.jsonl", truth)
    out = tmp_path / "report.json"
    argv = ["score", str(answers), *SPLIT, "--codec", "qwen2.5vl", "--frame", "normalized_1000", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "WARNING: the answers fit frame 'smart_resize' far better than the declared 'normalized_1000'" in text
    report = json.loads(out.read_text())
    assert report["frame"] == "normalized_1000" and report["metrics"]["acc_0.5"] == 0.0  # never the best frame's
    assert "far better" in report["warnings"][0]


def test_limits_of_smart_resize_change_the_frame(tmp_path, capsys, truth):
    # 64 px images: smart_resize gives 56 px with the default min_pixels, 84 px with min 84 * 84
    answers = _write(tmp_path / "answers.jsonl", truth)
    out = tmp_path / "report.json"
    assert main(["score", str(answers), *SPLIT, "--codec", "qwen2.5vl", "--min-pixels", str(84 * 84),
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["miou"] < 0.9  # answers written at 56 px, read at 84 px


@pytest.mark.parametrize("problem, lines, message", [
    ("bad json", [None, "{not json"], "line 2: not valid JSON"),
    ("unknown id", [None, None, {"image_id": 999, "text": "(1,2),(3,4)"}], "line 3: image_id 999 is not a referring sample"),
    ("no text", [None, {"image_id": 1}], "line 2: no 'text'"),
    ("no key", [{"text": "(1,2),(3,4)"}], "line 1: no 'sent_id' or 'image_id'"),
    ("two answers", [None, {"image_id": 0, "text": "(9,9),(10,10)"}], "line 2: a second, different answer to image_id 0"),
    ("sent ids on shapes", [{"sent_id": 4, "text": "(1,2),(3,4)"}], "keyed by sent_id, but this split's samples have none"),
    ("not an object", ["[1, 2, 3]"], "record 1: a JSON object is expected"),
])
def test_bad_input_is_named_by_file_and_line(tmp_path, capsys, truth, problem, lines, message):
    lines = [truth[0] if x is None else x for x in lines]
    answers = _write(tmp_path / "answers.jsonl", lines)
    assert main(["score", str(answers), *SPLIT, "--codec", "qwen2.5vl"]) == 2
    err = capsys.readouterr().err
    assert str(answers) in err and message in err and "Traceback" not in err


def test_missing_file_bad_split_and_bad_option(tmp_path, capsys, truth):
    assert main(["score", str(tmp_path / "nope.jsonl"), *SPLIT, "--codec", "qwen2vl"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope.jsonl'}: answers file not found" in err
    answers = _write(tmp_path / "answers.jsonl", truth)
    assert main(["score", str(answers), "--recipe", "shapes_rec", "--split", "testA", "--codec", "qwen2vl"]) == 2
    assert "--split testA" in capsys.readouterr().err
    assert main(["score", str(answers), *SPLIT, "--codec", "qwen2vl", "--bins", "8"]) == 2
    assert "'bins' applies to the 'bins' codec only" in capsys.readouterr().err
    assert main(["score", str(answers), "--recipe", "no_such_recipe", "--codec", "qwen2vl"]) == 2
    assert "neither a recipe nor a data recipe" in capsys.readouterr().err


def test_predict_records_carry_sentence_ids_and_read_back(tmp_path):
    """PredictionWriter's records of a RefCOCO-like batch carry sent_id / ref_id and score."""
    writer = PredictionWriter(tmp_path / "predictions.json")
    target = Targets(boxes=torch.tensor([[10.0, 10.0, 50.0, 40.0]]),
                     image_id=7, image_size=(100, 200))
    preds = [Predictions(boxes=target.boxes.clone(), text="<|box_start|>(50,100),(250,400)<|box_end|>", image_id=7),
             Predictions(text="no idea", parsed=False, image_id=7)]
    batch = SimpleNamespace(tasks=["rec", "rec"], original_targets=[target, target],
                            meta=[{"sent_id": 11, "ref_id": 3}, {"sent_id": 12, "ref_id": 3}])
    writer.on_predict_batch_end(None, None, preds, batch, 0)
    writer.on_predict_end(None, None)
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert [(r["sent_id"], r["ref_id"]) for r in records] == [(11, 3), (12, 3)]
    answers = read_answers(tmp_path / "predictions.json")
    assert [a.key for a in answers] == [("sent_id", 11), ("sent_id", 12)] and answers[0].place == "record 1"
    refs = [Reference(ids={"image_id": 7, "sent_id": s, "ref_id": 3}, target=target) for s in (11, 12)]
    report = score_answers(answers, refs, codec="qwen2vl", answers_file=str(tmp_path / "predictions.json"))
    assert report.metrics["acc_0.5"] == 0.5 and report.parse_failures == 1
    # several expressions of one image: an answer keyed by image_id would be ambiguous
    by_image = tmp_path / "by_image.jsonl"
    _write(by_image, [{"image_id": 7, "text": "(1,2),(3,4)"}])
    with pytest.raises(ValueError, match="key the answers by sent_id"):
        score_answers(read_answers(by_image), refs, codec="qwen2vl", answers_file=str(by_image))


@pytest.mark.slow
def test_vlzoo_predict_output_round_trips_through_score(tmp_path, capsys, monkeypatch):
    """`vlzoo predict` on a tiny (untrained) pixel2seq recipe, then `vlzoo score` on its file: the
    boxes vlzoo score reads from the text are the boxes predict wrote."""
    monkeypatch.setenv("CI", "1")
    predict_set = "data.predict={_target_: vlzoo.data.ShapesDataset, split: test, size: 6, tasks: [rec]}"
    common = ["data.train.size=4", "data.val.size=4", predict_set]
    output = tmp_path / "predictions.json"
    assert main(["predict", "shapes/pixel2seq_rec", *common, "trainer=cpu", "--output-dir", str(tmp_path / "run"),
                 "--output", str(output)]) == 0
    capsys.readouterr()
    report_file = tmp_path / "report.json"
    assert main(["score", str(output), "--recipe", "shapes/pixel2seq_rec", "--split", "predict", *common,
                 "--codec", "bins", "--bins", "32", "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["samples"] == 6 and report["answered"] == 6
    records = json.loads(output.read_text())
    from vlzoo.scoring.answers_parser import codec_for_scoring, parse_answer
    from vlzoo.scoring.score import load_split

    dataset, _ = load_split("shapes/pixel2seq_rec", "predict", overrides=common)
    refs = {r.ids["image_id"]: r for r in reference_samples(dataset)}
    frame = make_frame("pad_to_square")
    for record in records:
        parsed = parse_answer(record["text"], codec_for_scoring("bins", bins=32))
        if not parsed.parsed or "bbox" not in record:
            continue
        size = refs[record["image_id"]].target.image_size
        box = frame.fractions_to_original([parsed.boxes[0]], size)[0].tolist()
        x, y, w, h = record["bbox"]
        assert box == pytest.approx([x, y, x + w, y + h], abs=1e-3)


@pytest.fixture(scope="module")
def refer_recipe(tmp_path_factory):
    """A REFER release written from Shapes scenes, and a data recipe reading its val split."""
    from vlzoo.data.export import export_shapes_coco
    from vlzoo.data.shapes import ShapesDataset

    folder = tmp_path_factory.mktemp("refer")
    paths = export_shapes_coco(ShapesDataset(split="val", size=6, num_objects=(2, 4)), folder / "release")
    recipe = folder / "refer.yaml"
    recipe.write_text(
        "_target_: vlzoo.data.VLDataModule\n"
        "val:\n  _target_: vlzoo.data.RefCocoDataset\n"
        f"  refs_file: {paths['refs']}\n  instances_file: {paths['instances']}\n  image_dir: {paths['image_dir']}\n"
        "  split: val\n  tasks: [rec]\n"
    )
    return recipe


def test_refcoco_answers_keyed_by_sentence(tmp_path, capsys, refer_recipe):
    from vlzoo.paradigms.codecs import Qwen2VLCodec
    from vlzoo.scoring.score import load_split

    dataset, _ = load_split(str(refer_recipe), "val")
    refs = reference_samples(dataset)
    assert all("sent_id" in r.ids and "ref_id" in r.ids for r in refs)
    assert len({r.ids["image_id"] for r in refs}) < len(refs)  # several expressions per image
    lines = [{"sent_id": r.ids["sent_id"], "ref_id": r.ids["ref_id"],
              "text": Qwen2VLCodec().encode(r.target.boxes[:1], r.target.image_size)} for r in refs]
    answers = _write(tmp_path / "answers.jsonl", lines)
    out = tmp_path / "report.json"
    argv = ["score", str(answers), "--recipe", str(refer_recipe), "--split", "val", "--codec", "qwen2vl"]
    assert main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["acc_0.5"] == 1.0
    capsys.readouterr()
    _write(answers, [*lines[:2], {"sent_id": 98765, "text": "(1,2),(3,4)"}])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{answers} line 3: sent_id 98765 is not a referring sample" in err
    _write(answers, [{"image_id": refs[0].ids["image_id"], "text": "(1,2),(3,4)"}])
    assert main(argv) == 2
    assert "key the answers by sent_id" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- res / det
def _res_lines(size: int = 8) -> tuple[list[dict], list]:
    from vlzoo.paradigms.codecs import Florence2Codec
    from vlzoo.scoring.score import load_split
    from vlzoo.structures import mask_to_polygon

    dataset, _ = load_split("shapes_res", "val", overrides=[f"data.val.size={size}"])
    refs = reference_samples(dataset, task="res")
    codec = Florence2Codec()
    lines = [{"image_id": r.ids["image_id"], "task": "res",
              "text": "<REFERRING_EXPRESSION_SEGMENTATION>" + codec.encode_points(mask_to_polygon(r.target.masks[0]),
                                                                                 r.target.image_size)}
             for r in refs]
    return lines, refs


def test_score_res_prints_ciou_and_reads_predict_masks(tmp_path, capsys):
    lines, refs = _res_lines()
    answers = _write(tmp_path / "answers.jsonl", lines)
    out = tmp_path / "report.json"
    argv = ["score", str(answers), "--recipe", "shapes_res", "--split", "val", "data.val.size=8"]
    assert main([*argv, "--task", "res", "--codec", "florence2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "task res, codec florence2, frame original" in text and "ciou 0.9" in text and "WARNING" not in text
    report = json.loads(out.read_text())
    assert report["task"] == "res" and report["forms"] == {"tokens": 8} and report["metrics"]["ciou"] > 0.85
    # vlzoo predict's records of a res batch: the mask as a COCO RLE in 'segmentation', scored as is
    writer = PredictionWriter(tmp_path / "predictions.json")
    preds = [Predictions(masks=r.target.masks.clone(), boxes=r.target.boxes.clone(), text="<loc_1>",
                         image_id=r.ids["image_id"])
             for r in refs]
    batch = SimpleNamespace(tasks=["res"] * len(refs), original_targets=[r.target for r in refs],
                            meta=[{} for _ in refs])
    writer.on_predict_batch_end(None, None, preds, batch, 0)
    writer.on_predict_end(None, None)
    assert all("segmentation" in r for r in json.loads((tmp_path / "predictions.json").read_text()))
    predicted = tmp_path / "predictions.json"
    assert main(["score", str(predicted), *argv[2:], "--task", "res", "--codec", "florence2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["ciou"] == 1.0 and report["details"]["segmentation_fields"] == 8


@pytest.mark.parametrize("problem, record, message", [
    ("rle of another size", {"image_id": 0, "segmentation": {"size": [10, 10], "counts": "0"}},
     "line 1: the RLE is 10x10 but the image is 64x64"),
    ("neither text nor mask", {"image_id": 0}, "line 1: no 'text' (the model's answer) or 'segmentation'"),
    ("not a segmentation", {"image_id": 0, "segmentation": "abc"}, "line 1: 'segmentation' must be a COCO RLE"),
])
def test_bad_res_records_are_named(tmp_path, capsys, problem, record, message):
    answers = _write(tmp_path / "answers.jsonl", [record])
    assert main(["score", str(answers), "--recipe", "shapes_res", "--split", "val", "data.val.size=4",
                 "--task", "res", "--codec", "florence2"]) == 2
    err = capsys.readouterr().err
    assert str(answers) in err and message in err and "Traceback" not in err


def test_a_split_without_the_task_says_so(tmp_path, capsys, truth):
    answers = _write(tmp_path / "answers.jsonl", truth)
    assert main(["score", str(answers), *SPLIT, "--task", "det", "--codec", "qwen2.5vl"]) == 2
    assert "no detection (det) samples" in capsys.readouterr().err


@pytest.fixture(scope="module")
def coco_recipe(tmp_path_factory):
    """Shapes scenes exported as COCO instances, read by CocoDataset: one det sample per
    (image, category), so an image holds several samples."""
    from vlzoo.data.export import export_shapes_coco
    from vlzoo.data.shapes import ShapesDataset

    folder = tmp_path_factory.mktemp("coco")
    paths = export_shapes_coco(ShapesDataset(split="val", size=6, num_objects=(3, 5), seed=5), folder / "release")
    recipe = folder / "coco.yaml"
    recipe.write_text(
        "_target_: vlzoo.data.VLDataModule\n"
        "val:\n  _target_: vlzoo.data.CocoDataset\n"
        f"  annotation_file: {paths['instances']}\n  image_dir: {paths['image_dir']}\n  tasks: [det]\n"
    )
    return recipe


def test_score_det_on_coco_images_with_several_categories(tmp_path, capsys, coco_recipe):
    from vlzoo.scoring.score import load_split

    dataset, _ = load_split(str(coco_recipe), "val")
    refs = reference_samples(dataset, task="det")
    by_image: dict[int, list] = {}
    for r in refs:
        by_image.setdefault(r.ids["image_id"], []).append(r)
    assert any(len(v) > 1 for v in by_image.values())  # several categories in one image
    frame = make_frame("smart_resize")
    lines = []
    for image_id, group in by_image.items():
        objects = [{"bbox_2d": [round(v) for v in frame.from_original(b[None], r.target.image_size)[0].tolist()],
                    "label": r.category_name} for r in group for b in r.target.boxes]
        lines.append({"image_id": image_id, "text": "```json\n" + json.dumps(objects) + "\n```"})
    lines[0]["text"] = lines[0]["text"].replace("]\n```", ', {"bbox_2d": [1, 1, 4, 4], "label": "unicorn"}]\n```')
    answers = _write(tmp_path / "answers.jsonl", lines)
    out = tmp_path / "report.json"
    assert main(["score", str(answers), "--recipe", str(coco_recipe), "--split", "val", "--task", "det",
                 "--codec", "qwen2.5vl", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "task det" in text and "map_50 1.0000" in text and "labels of no category 1 ('unicorn' 1)" in text
    assert "WARNING: 1 of" in text and "'unicorn'" in text
    report = json.loads(out.read_text())
    assert report["samples"] == len(by_image) and report["metrics"]["map_50"] == 1.0
    assert report["details"]["unknown_label_names"] == {"unicorn": 1}


def test_predict_det_records_of_several_categories_of_one_image_read_back(tmp_path):
    """vlzoo predict on a split with one det sample per (image, category): one text per category,
    each box's record naming its category; read back as one answer per image."""
    size = (100, 200)
    circles = Targets(boxes=torch.tensor([[10.0, 10.0, 40.0, 40.0], [120.0, 50.0, 160.0, 90.0]]),
                      labels=torch.tensor([1, 1]), image_id=3, image_size=size)
    crosses = Targets(boxes=torch.tensor([[60.0, 20.0, 90.0, 60.0]]), labels=torch.tensor([5]), image_id=3,
                      image_size=size)
    nothing = Targets(image_id=3, image_size=size)
    texts = ["<|box_start|>(10,10),(40,40)<|box_end|><|box_start|>(120,50),(160,90)<|box_end|>",
             "<|box_start|>(60,20),(90,60)<|box_end|>", "none"]
    preds = [Predictions(boxes=t.boxes.clone(), labels=t.labels.clone(), text=x, image_id=3)
             for t, x in zip((circles, crosses, nothing), texts, strict=True)]
    writer = PredictionWriter(tmp_path / "predictions.json")
    batch = SimpleNamespace(tasks=["det"] * 3, original_targets=[circles, crosses, nothing], meta=[{}, {}, {}],
                            category_ids=[1, 5, 2])
    writer.on_predict_batch_end(None, None, preds, batch, 0)
    writer.on_predict_end(None, None)
    answers = read_answers(tmp_path / "predictions.json", task="det")
    assert len(answers) == 1 and set(answers[0].parts) == {1, 5, None}
    refs = [Reference(ids={"image_id": 3}, target=t, category_id=c, category_name=n)
            for t, c, n in ((circles, 1, "circle"), (crosses, 5, "cross"), (nothing, 2, "square"))]
    report = score_answers(answers, refs, codec="qwen2.5vl", frame="original", task="det")
    assert report.metrics["map"] == 1.0 and report.details["scored_boxes"] == 3 and not report.warnings
    assert report.forms == {"pairs": 1}
