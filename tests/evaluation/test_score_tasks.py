"""vlzoo score for RES and detection answers is exact: the ground truth written through each
family's frame and codec scores cIoU 1.0 up to the polygon's quantisation (stated per family in
TOLERANCE) and AP 1.0; the same text in a wrong frame scores lower and warns; labels map to the
split's categories and what cannot be scored is counted."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlzoo.data.frames import FAMILY_FRAMES, make_frame
from vlzoo.data.shapes import ShapesDataset
from vlzoo.paradigms.codecs import CODECS, make_codec
from vlzoo.predictions import encode_rle
from vlzoo.scoring.answers_parser import codec_for_scoring
from vlzoo.scoring.objects_parser import parse_polygons
from vlzoo.scoring.score import FAR_BETTER_GAIN, Answer, Reference, reference_samples, score_answers
from vlzoo.scoring.tasks import points_to_original, resolve_label
from vlzoo.structures import Targets, answer_order, mask_to_polygon, polygon_to_mask

#: the wrong frame each family is declared in (as in test_score_exactness)
WRONG = {
    "qwen2vl": "original",
    "qwen2.5vl": "normalized_1000",
    "paligemma": "pad_to_square",
    "florence2": "pad_to_square",
    "kosmos2": "pad_to_square",
    "shikra": "normalized_1",
    "bins": "original",
}
#: cIoU lost to the quantisation of the polygon's vertices, on 64 x 64 / 64 x 112 Shapes images:
#: 1000-bin families (and Shikra's 3 decimals) move a vertex by < 0.1 px; the coarse grids by up
#: to half a step: bins (64 per axis: 1-1.75 px), Qwen2.5-VL (whole pixels of a 56 px resized
#: input) and Kosmos-2 (32 x 32 patch centres: 2-3.5 px)
TOLERANCE = {"florence2": 0.01, "paligemma": 0.01, "qwen2vl": 0.01, "shikra": 0.01,
             "bins": 0.13, "qwen2.5vl": 0.08, "kosmos2": 0.18}
#: families whose boxes survive quantisation with IoU >= 0.95 (COCO's strictest threshold), so
#: AP@[.5:.95] is 1.0 too; for the others AP@0.5 is
FINE = ("florence2", "paligemma", "qwen2vl", "shikra")
PAD = 24  # a wide image: the 64 px scene with 24 px of padding left and right


def _wide(target: Targets) -> Targets:
    masks = None if target.masks is None else F.pad(target.masks.float(), (PAD, PAD)).bool()
    return target.replace(masks=masks, boxes=target.boxes + torch.tensor([PAD, 0.0, PAD, 0.0]),
                          image_size=(64, 64 + 2 * PAD))


def _polygon_truth(ref: Reference) -> tuple[Reference, torch.Tensor]:
    """The reference with its mask replaced by what its polygon (mask_to_polygon) rasterises to,
    and the polygon: the best a polygon answer can do."""
    poly = mask_to_polygon(ref.target.masks[0])
    mask = polygon_to_mask(poly, ref.target.image_size)[None]
    return Reference(ids=dict(ref.ids), target=ref.target.replace(masks=mask)), poly


@pytest.fixture(scope="module")
def res_refs() -> dict[str, list[tuple[Reference, torch.Tensor]]]:
    refs = reference_samples(ShapesDataset(split="val", size=32, image_size=64, tasks=["res"], seed=3), task="res")
    wide = [Reference(ids=dict(r.ids), target=_wide(r.target)) for r in refs]
    return {"square": [_polygon_truth(r) for r in refs], "wide": [_polygon_truth(r) for r in wide],
            "true": refs}


@pytest.fixture(scope="module")
def det_refs() -> dict[str, list[Reference]]:
    refs = reference_samples(ShapesDataset(split="val", size=32, image_size=64, tasks=["det"], seed=3), task="det")
    wide = [Reference(ids=dict(r.ids), target=_wide(r.target), category_id=r.category_id,
                      category_name=r.category_name) for r in refs]
    return {"square": refs, "wide": wide}


def polygon_text(family: str, polygon: torch.Tensor, size: tuple[int, int]) -> str:
    """A polygon (original pixels) as the family's model writes it: its codec, in its frame."""
    frame = make_frame(FAMILY_FRAMES[family])
    if family == "qwen2vl":
        return make_codec(family).encode_points(polygon, size)  # 0..1000 of the image
    points = frame.transform(size).points_to_input(polygon.double())
    return make_codec(family).encode_points(points, frame.reference_size(size))


def detection_text(family: str, boxes: torch.Tensor, label: str, size: tuple[int, int]) -> str:
    """Every box of one category as the family's detection answer (labelled where the family labels)."""
    frame = make_frame(FAMILY_FRAMES[family])
    boxes = boxes[answer_order(boxes)]
    if family == "qwen2.5vl":  # [{"bbox_2d": [...], "label": ...}] in smart_resize pixels
        pixels = frame.from_original(boxes, size).round().long().tolist()
        return "```json\n" + json.dumps([{"bbox_2d": b, "label": label} for b in pixels], indent=2) + "\n```"
    codec = make_codec(family)
    if family == "qwen2vl":
        return codec.encode(boxes, size, phrase=label)
    phrase = None if family in ("bins", "shikra") else label  # vlzoo's det answers name no category
    return codec.encode(frame.transform(size).boxes_to_input(boxes), frame.reference_size(size), phrase=phrase)


def _answers(texts: list[str], refs: list[Reference]) -> list[Answer]:
    return [Answer(line=i + 1, key=("image_id", r.ids["image_id"]), text=t)
            for i, (t, r) in enumerate(zip(texts, refs, strict=True))]


# --------------------------------------------------------------------------------------------- RES
@pytest.mark.parametrize("family", sorted(CODECS))
@pytest.mark.parametrize("layout", ["square", "wide"])
def test_res_ground_truth_scores_one_up_to_quantisation(family, layout, res_refs):
    pairs = res_refs[layout]
    refs = [r for r, _ in pairs]
    texts = [polygon_text(family, poly, r.target.image_size) for r, poly in pairs]
    report = score_answers(_answers(texts, refs), refs, codec=family, task="res")
    assert report.task == "res" and report.frame == FAMILY_FRAMES[family]
    assert report.parse_failures == 0 and report.missing == 0 and not report.warnings
    assert 1.0 - TOLERANCE[family] <= report.metrics["ciou"] <= 1.0
    assert report.metrics["giou"] >= 1.0 - TOLERANCE[family] - 0.02


@pytest.mark.parametrize("layout", ["square", "wide"])
def test_res_unquantised_polygons_and_rle_masks_score_exactly_one(layout, res_refs, tmp_path):
    pairs = res_refs[layout]
    refs = [r for r, _ in pairs]
    texts = [json.dumps(poly.tolist()) for _, poly in pairs]  # float vertices in original pixels
    report = score_answers(_answers(texts, refs), refs, codec="qwen2.5vl", frame="original", task="res")
    assert report.metrics["ciou"] == 1.0 and report.metrics["giou"] == 1.0 and report.forms == {"json": len(refs)}
    # a mask in a record's segmentation field (what vlzoo predict writes) against the true masks
    true = res_refs["true"] if layout == "square" else [Reference(ids=r.ids, target=_wide(r.target))
                                                         for r in res_refs["true"]]
    path = tmp_path / "masks.jsonl"
    path.write_text("".join(json.dumps({"image_id": r.ids["image_id"], "task": "res",
                                        "segmentation": encode_rle(r.target.masks[0])}) + "\n" for r in true))
    from vlzoo.scoring.score import read_answers

    report = score_answers(read_answers(path, task="res"), true, codec="florence2", task="res", answers_file=str(path))
    assert report.metrics["ciou"] == 1.0 and report.details["segmentation_fields"] == len(true)
    assert report.forms == {"segmentation": len(true)} and not report.warnings
    assert all(f["ciou"] == 1.0 for f in report.by_frame.values())  # a mask has no frame


@pytest.mark.parametrize("family", sorted(CODECS))
def test_res_wrong_frame_scores_lower_and_warns(family, res_refs):
    pairs = res_refs["wide"]
    refs = [r for r, _ in pairs]
    texts = [polygon_text(family, poly, r.target.image_size) for r, poly in pairs]
    report = score_answers(_answers(texts, refs), refs, codec=family, frame=WRONG[family], task="res")
    right = report.by_frame[FAMILY_FRAMES[family]]["ciou"]
    assert report.metrics["ciou"] <= right - FAR_BETTER_GAIN
    (warning,) = [w for w in report.warnings if "far better" in w]
    assert f"declared '{WRONG[family]}'" in warning and "ciou" in warning
    assert "WARNING: the answers fit frame" in report.format()


@pytest.mark.parametrize("family", sorted(CODECS))
def test_res_reading_agrees_with_the_codecs_own_decode(family, res_refs):
    frame = make_frame(FAMILY_FRAMES[family])
    reader = codec_for_scoring(family)
    for ref, poly in res_refs["wide"][:8]:
        size = ref.target.image_size
        text = polygon_text(family, poly, size)
        parsed = parse_polygons(text, reader)
        ours = points_to_original(parsed.polygons[0], frame, size, fractions=parsed.fractions)
        if family == "qwen2vl":
            theirs = make_codec(family).decode_points(text, size)
        else:
            decoded = reader.decode_points(text, frame.reference_size(size))
            theirs = frame.transform(size).points_to_original(decoded.double())
        assert torch.allclose(ours, theirs.double(), atol=1e-3), family


def test_res_misses_and_short_polygons_are_counted(res_refs):
    pairs = res_refs["square"]
    refs = [r for r, _ in pairs]
    texts = [polygon_text("florence2", poly, r.target.image_size) for r, poly in pairs]
    texts[0] = "I cannot find it."
    texts[1] = "<loc_1><loc_2><loc_3><loc_4>"  # two vertices: no polygon
    answers = _answers(texts, refs)[:-4]
    report = score_answers(answers, refs, codec="florence2", task="res")
    assert report.parse_failures == 2 and report.missing == 4 and report.details["dropped_polygons"] == 1
    assert any("have no answer" in w for w in report.warnings)
    assert "polygons under 3 vertices 1" in report.format()


# --------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("family", sorted(CODECS))
@pytest.mark.parametrize("layout", ["square", "wide"])
def test_detection_ground_truth_scores_ap_one(family, layout, det_refs):
    refs = det_refs[layout]
    texts = [detection_text(family, r.target.boxes, r.category_name, r.target.image_size) for r in refs]
    report = score_answers(_answers(texts, refs), refs, codec=family, task="det")
    assert report.task == "det" and report.parse_failures == 0 and not report.warnings
    assert report.details["scored_boxes"] == report.details["boxes"] == sum(len(r.target) for r in refs)
    assert report.metrics["map_50"] == 1.0
    if family in FINE:
        assert report.metrics["map"] == 1.0


@pytest.mark.parametrize("family", sorted(CODECS))
def test_detection_wrong_frame_scores_lower_and_warns(family, det_refs):
    refs = det_refs["wide"]
    texts = [detection_text(family, r.target.boxes, r.category_name, r.target.image_size) for r in refs]
    report = score_answers(_answers(texts, refs), refs, codec=family, frame=WRONG[family], task="det")
    right = report.by_frame[FAMILY_FRAMES[family]]["map"]
    assert report.metrics["map"] <= right - FAR_BETTER_GAIN
    (warning,) = [w for w in report.warnings if "far better" in w]
    assert f"declared '{WRONG[family]}'" in warning and "(map " in warning


def test_labels_map_to_the_splits_categories():
    names = {"circle": 1, "square": 2, "cross": 5, "traffic light": 7}
    assert resolve_label("circle", names) == 1
    assert resolve_label("The Red Circles.", names) == 1
    assert resolve_label("crosses", names) == 5
    assert resolve_label("small green square", names) == 2
    assert resolve_label("traffic_lights", names) == 7
    assert resolve_label("blob", names) is None and resolve_label("", names) is None


def test_several_categories_of_one_image_are_one_unit_and_unknowns_are_counted():
    """Two det samples of one image (as COCO's one sample per category): one answer lists both."""
    size = (100, 200)
    circles = Targets(boxes=torch.tensor([[10.0, 10.0, 40.0, 40.0], [120.0, 50.0, 160.0, 90.0]]),
                      labels=torch.tensor([1, 1]), image_id=3, image_size=size)
    crosses = Targets(boxes=torch.tensor([[60.0, 20.0, 90.0, 60.0]]), labels=torch.tensor([5]), image_id=3,
                      image_size=size)
    refs = [Reference(ids={"image_id": 3}, target=circles, category_id=1, category_name="circle"),
            Reference(ids={"image_id": 3}, target=crosses, category_id=5, category_name="cross")]
    objects = [{"bbox_2d": [10, 10, 40, 40], "label": "circle"}, {"bbox_2d": [60, 20, 90, 60], "label": "a cross"},
               {"bbox_2d": [120, 50, 160, 90], "label": "red circles"}]
    answer = [Answer(line=1, key=("image_id", 3), text=json.dumps(objects))]
    report = score_answers(answer, refs, codec="qwen2.5vl", frame="original", task="det")
    assert report.samples == 1 and report.metrics["map"] == 1.0 and not report.warnings
    # an unknown label and an unlabelled box (the image has two categories) are counted, not scored
    extra = [*objects, {"bbox_2d": [0, 0, 5, 5], "label": "blob"}, [1, 1, 9, 9]]
    answer = [Answer(line=1, key=("image_id", 3), text=json.dumps(extra))]
    report = score_answers(answer, refs, codec="qwen2.5vl", frame="original", task="det")
    assert report.metrics["map"] == 1.0  # the two unscored boxes are no false positives of any category
    assert report.details["unknown_labels"] == 1 and report.details["unlabelled"] == 1
    assert report.details["unknown_label_names"] == {"blob": 1} and report.details["scored_boxes"] == 3
    (warning,) = report.warnings
    assert "2 of 5 boxes are not scored" in warning and "'blob'" in warning and "'circle', 'cross'" in warning
    # a box of a known category where there is none is a false positive (written first: boxes
    # without scores rank in the order written)
    wrong = [{"bbox_2d": [0, 50, 50, 100], "label": "cross"}, *objects]
    answer = [Answer(line=1, key=("image_id", 3), text=json.dumps(wrong))]
    assert score_answers(answer, refs, codec="qwen2.5vl", frame="original", task="det").metrics["map"] < 1.0


def test_detection_answers_are_keyed_by_image(det_refs):
    refs = det_refs["square"]
    with pytest.raises(ValueError, match="keyed by image_id"):
        score_answers([Answer(line=1, key=("sent_id", 1), text="[1, 2, 3, 4]")], refs, codec="qwen2.5vl", task="det")
    with pytest.raises(ValueError, match="line 1: image_id 999 is not an image"):
        score_answers([Answer(line=1, key=("image_id", 999), text="[1, 2, 3, 4]")], refs, codec="qwen2.5vl",
                      task="det")
