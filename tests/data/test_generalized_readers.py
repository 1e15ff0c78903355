"""gRefCOCO and ReasonSeg readers on fixtures in the official formats, their bad-record errors, and
the Shapes exports in both formats read back exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlzoo.data.errors import DataError
from vlzoo.data.export_generalized import export_shapes_grefcoco, export_shapes_reasonseg, mask_to_polygons
from vlzoo.data.grefcoco import GRefCocoDataset
from vlzoo.data.reasonseg import ReasonSegDataset, paint_reasonseg
from vlzoo.data.shapes import ShapesDataset
from vlzoo.data.transforms import ResizeTransform
from vlzoo.evaluation.generalized import (
    GeneralizedReferringSegmentation,
    TargetsWithIgnore,
    generalized_baselines,
)
from vlzoo.structures import Predictions

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def grefcoco(tmp_path):
    root = tmp_path / "grefcoco"
    shutil.copytree(FIXTURES / "grefcoco", root)
    images = tmp_path / "train2014"
    images.mkdir()
    for im in json.loads((root / "instances.json").read_text())["images"]:
        Image.new("RGB", (im["width"], im["height"]), (90, 30, 200)).save(images / im["file_name"], quality=95)
    return {"refs_file": root / "grefs(unc).json", "instances_file": root / "instances.json", "image_dir": images}


def test_grefcoco_reader_sets_of_zero_one_and_several(grefcoco) -> None:
    ds = GRefCocoDataset(**grefcoco, split="val", tasks=["res"])
    assert len(ds) == 5  # one sample per sentence of the val refs (ref 2 has two)
    by_sent = {ds[i].meta["sent_id"]: ds[i] for i in range(len(ds))}
    a, b = _rect(16, 20, 2, 2, 8, 10), _rect(16, 20, 10, 4, 18, 10)
    one = by_sent[101]
    assert one.targets.boxes.tolist() == [[2.0, 2.0, 8.0, 10.0]] and torch.equal(one.targets.masks[0], torch.from_numpy(a))
    assert one.targets.expressions == ["the person on the left"] and "the person on the left" in one.prompt
    several = by_sent[202]
    assert several.targets.boxes.tolist() == [[2.0, 2.0, 8.0, 10.0], [10.0, 4.0, 18.0, 10.0]]
    assert several.targets.labels.tolist() == [1, 3] and several.meta["categories"] == ["person", "car"]
    assert torch.equal(several.targets.masks, torch.from_numpy(np.stack([a, b])))
    nothing = by_sent[301]
    assert len(nothing.targets) == 0 and nothing.targets.masks.shape == (0, 16, 20) and nothing.meta["no_target"]
    crowd_left_out = by_sent[401]  # ann 13 is a crowd region: not part of the set
    assert crowd_left_out.meta["annotation_ids"] == [12] and len(crowd_left_out.targets) == 1
    everything = ds.image_objects(0)
    assert everything.boxes.shape == (2, 4) and everything.masks.shape == (2, 16, 20)
    assert [s.meta["ref_id"] for s in GRefCocoDataset(**grefcoco, split="testA", tasks=["rec"])] == [5]
    assert GRefCocoDataset(**grefcoco, split="testA", tasks=["rec"])[0].targets.masks is None


def test_grefcoco_baselines_on_the_fixture(grefcoco) -> None:
    ds = GRefCocoDataset(**grefcoco, split="val", tasks=["res"])
    samples = [ds[i] for i in range(len(ds))]
    out = generalized_baselines(samples, image_objects=[ds.image_objects(i) for i in range(len(ds))])
    # 5 samples, 1 no-target: nothing gets it right only there; everything (A and B) matches refs 2 twice
    assert out["always_nothing"]["rec/pr_f1_0.5"] == pytest.approx(1 / 5)
    assert out["always_nothing"]["res/n_acc"] == 1.0 and out["always_nothing"]["res/giou"] == pytest.approx(1 / 5)
    assert out["always_everything"]["rec/pr_f1_0.5"] == pytest.approx(2 / 5)
    assert out["always_everything"]["res/n_acc"] == 0.0


def _edit(paths, ref_id, **changes):
    refs = json.loads(paths["refs_file"].read_text())
    for r in refs:
        if r["ref_id"] == ref_id:
            r.update(changes)
            for k, v in changes.items():
                if v is None:
                    del r[k]
    paths["refs_file"].write_text(json.dumps(refs))


@pytest.mark.parametrize(
    ("ref_id", "changes", "message"),
    [
        (1, {"ann_id": None}, "'ann_id' must be"),
        (1, {"ann_id": [11, -1]}, "mixes -1"),
        (3, {"no_target": False}, "'no_target' is False"),
        (1, {"no_target": True}, "'no_target' is True"),
        (1, {"ann_id": [99]}, "ann_id 99 is not in"),
        (5, {"split": "val", "ann_id": [11]}, "annotation 11 belongs to image 1, not 2"),
        (1, {"sentences": []}, "'sentences' must be"),
        (1, {"sentences": [{"sent_id": 1, "sent": " "}]}, "every sentence is empty"),
        (1, {"ann_id": [13]}, "crowd"),
        (1, {"image_id": 7}, "image_id 7 is not in"),
    ],
)
def test_grefcoco_bad_records_name_the_file_and_ref(grefcoco, ref_id, changes, message) -> None:
    _edit(grefcoco, ref_id, **changes)
    with pytest.raises(DataError, match=message) as err:
        GRefCocoDataset(**grefcoco, split="val")
    assert f"grefs(unc).json ref {ref_id}" in str(err.value) and "on_bad_sample: skip" in str(err.value)
    skipped = GRefCocoDataset(**grefcoco, split="val", on_bad_sample="skip")
    assert skipped.num_skipped == 1


def test_grefcoco_bad_files(grefcoco, tmp_path) -> None:
    grefcoco["refs_file"].write_text("[{\"ref_id\": 1,")
    with pytest.raises(DataError, match="malformed JSON"):
        GRefCocoDataset(**grefcoco)
    with pytest.raises(DataError, match="grefs file not found"):
        GRefCocoDataset(**{**grefcoco, "refs_file": tmp_path / "grefs(unc).json.missing"})
    grefcoco["refs_file"].write_text(json.dumps({"refs": []}))
    with pytest.raises(DataError, match="list of refs"):
        GRefCocoDataset(**grefcoco)


# --- ReasonSeg -------------------------------------------------------------------------------

@pytest.fixture
def reasonseg(tmp_path):
    root = tmp_path / "ReasonSeg"
    shutil.copytree(FIXTURES / "reasonseg", root)
    for path in (root / "val").glob("*.json"):
        Image.new("RGB", (16, 12), (10, 200, 40)).save(path.with_suffix(".jpg"), quality=95)
    return root


def test_reasonseg_reader_paints_as_lisa_and_carries_the_ignore_region(reasonseg) -> None:
    ds = ReasonSegDataset(data_dir=reasonseg, split="val")
    assert len(ds) == 2  # the first query of each example
    by_name = {ds[i].meta["file_name"]: ds[i] for i in range(len(ds))}
    short = by_name["inside_ignore.jpg"]
    ignore = _rect(12, 16, 6, 4, 8, 6)  # the smaller ignore polygon is painted over the target
    assert isinstance(short.targets, TargetsWithIgnore)
    assert torch.equal(short.targets.masks[0], torch.from_numpy(_rect(12, 16, 2, 2, 10, 8) & ~ignore))
    assert torch.equal(short.targets.ignore_mask, torch.from_numpy(ignore))
    assert short.targets.boxes.tolist() == [[2.0, 2.0, 10.0, 8.0]] and not short.meta["is_sentence"]
    long = by_name["long_query.jpg"]
    small, corner = _rect(12, 16, 3, 3, 5, 5), _rect(12, 16, 13, 8, 16, 12)
    assert torch.equal(long.targets.masks[0], torch.from_numpy(small | corner))  # smaller targets win over the ignore
    assert torch.equal(long.targets.ignore_mask, torch.from_numpy(_rect(12, 16, 0, 0, 12, 10) & ~small))
    assert long.prompt.startswith("What in this kitchen")
    assert [s.meta["is_sentence"] for s in ReasonSegDataset(data_dir=reasonseg, queries="long")] == [True]
    assert [s.meta["is_sentence"] for s in ReasonSegDataset(data_dir=reasonseg, queries="short")] == [False]
    # the ignore region rides along the resize transform (original pixels: only the metrics read it)
    _, moved, _ = ResizeTransform(size=32)(short.image, short.targets)
    assert isinstance(moved, TargetsWithIgnore) and moved.ignore_mask is short.targets.ignore_mask
    every = ReasonSegDataset(data_dir=reasonseg, phrasings="all")
    assert len(every) == 3 and sorted(s.meta["query_index"] for s in every) == [0, 0, 1]
    # scored as LISA scores it: an answer that covers the ignore region too is still exact
    m = GeneralizedReferringSegmentation()
    m.update([Predictions(masks=torch.from_numpy(_rect(12, 16, 2, 2, 10, 8)[None]))], [short.targets])
    assert float(m.compute()["giou"]) == 1.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{\"text\": [\"a\"], ", "malformed JSON"),
        (json.dumps({"text": [], "is_sentence": False, "shapes": []}), "'text' must be"),
        (json.dumps({"text": ["a"], "is_sentence": "no", "shapes": []}), "'is_sentence' must be"),
        (json.dumps({"text": ["a"], "is_sentence": False, "shapes": {}}), "'shapes' must be"),
        (json.dumps({"text": ["a"], "is_sentence": False, "shapes": [{"label": "target", "points": [[0, 0], [1, 1]]}]}),
         r"shapes\[0\] \(label 'target'\): 'points'"),
        (json.dumps({"text": ["a"], "is_sentence": False, "shapes": [{"points": [[0, 0], [1, 1], [2, 0]]}]}),
         r"shapes\[0\]: a shape needs a text 'label'"),
    ],
)
def test_reasonseg_bad_records(reasonseg, content, message) -> None:
    bad = reasonseg / "val" / "bad.json"
    bad.write_text(content)
    Image.new("RGB", (16, 12)).save(bad.with_suffix(".jpg"))
    with pytest.raises(DataError, match=message) as err:
        ReasonSegDataset(data_dir=reasonseg)
    assert "bad.json" in str(err.value) and "on_bad_sample: skip" in str(err.value)
    assert ReasonSegDataset(data_dir=reasonseg, on_bad_sample="skip").num_skipped == 1


def test_reasonseg_missing_image_and_folder(reasonseg) -> None:
    (reasonseg / "val" / "long_query.jpg").unlink()
    with pytest.raises(DataError, match="long_query.json: no image beside it"):
        ReasonSegDataset(data_dir=reasonseg)
    with pytest.raises(DataError, match="split folder not found"):
        ReasonSegDataset(data_dir=reasonseg, split="test")


# --- Shapes exports, read back -------------------------------------------------------------------

def test_mask_to_polygons_rasterises_back_exactly() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((9, 13)) > 0.5
    shapes = [{"label": "target", "points": p} for p in mask_to_polygons(mask)]
    target, ignore = paint_reasonseg(shapes, 9, 13)
    assert np.array_equal(target, mask) and not ignore.any()


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(split="val", size=8, tasks=["rec", "res"], num_objects=(2, 4))


def test_shapes_grefcoco_round_trip(shapes, tmp_path) -> None:
    p = export_shapes_grefcoco(shapes, tmp_path)
    ds = GRefCocoDataset(refs_file=p["grefs"], instances_file=p["instances"], image_dir=p["image_dir"], tasks=["res"])
    refs = json.loads(p["grefs"].read_text())
    assert len(ds) == sum(len(r["sentences"]) for r in refs) > len(shapes)  # several phrasings per ref
    for i in range(len(ds)):
        s = ds[i]
        index = s.image_id - 1
        ref = shapes[index]
        scene = shapes.scene(index)
        ids = ref.meta["object_ids"]
        assert torch.equal(s.image, ref.image)
        assert torch.equal(s.targets.boxes, torch.tensor(np.array([scene.objects[k].box for k in ids]), dtype=torch.float32))
        assert torch.equal(s.targets.masks, torch.from_numpy(np.stack([scene.owner == k for k in ids])))
        first = next(r for r in refs if r["ref_id"] == s.meta["ref_id"])["sent_ids"][0]
        if s.meta["sent_id"] == first:
            assert s.targets.expressions == ref.targets.expressions
        assert len(ds.image_objects(i)) == len(scene.objects)


def test_shapes_reasonseg_round_trip_with_ignore_ring(shapes, tmp_path) -> None:
    p = export_shapes_reasonseg(shapes, tmp_path, ignore_margin=1, long_queries=True)
    ds = ReasonSegDataset(data_dir=p["root"], split="val", phrasings="all")
    assert {s.meta["is_sentence"] for s in ds} == {True, False}
    for s in ds:
        index = int(s.meta["file_name"][:6])
        ref = shapes[index]
        scene = shapes.scene(index)
        target = np.zeros(scene.size, dtype=bool)
        for k in ref.meta["object_ids"]:
            target |= scene.owner == k
        assert torch.equal(s.image, ref.image)
        assert torch.equal(s.targets.masks[0], torch.from_numpy(target))
        ring = s.targets.ignore_mask.numpy()
        assert ring.any() and not (ring & target).any()
        ys, xs = np.nonzero(ring)
        ty, tx = np.nonzero(target)
        assert ys.min() == max(ty.min() - 1, 0) and xs.max() == min(tx.max() + 1, scene.size[1] - 1)
        if s.meta["query_index"] == 0 and not s.meta["is_sentence"]:
            assert s.targets.expressions == ref.targets.expressions


def test_shapes_generalized_export_reads_back_as_grec_gres_sets(tmp_path) -> None:
    """A grec / gres Shapes dataset exports its no-target and multi-target expressions, and the
    gRefCOCO reader gives the same sets back under the generalized task names."""
    shapes = ShapesDataset(split="val", size=16, tasks=["gres"], referents={"none": 0.3, "one": 0.3, "several": 0.4})
    p = export_shapes_grefcoco(shapes, tmp_path, phrasings=1)
    refs = json.loads(p["grefs"].read_text())
    assert any(r["no_target"] for r in refs) and any(len(r["ann_id"]) >= 2 for r in refs)
    ds = GRefCocoDataset(refs_file=p["grefs"], instances_file=p["instances"], image_dir=p["image_dir"], tasks=["gres"])
    assert len(ds) == len(shapes)
    for i in range(len(ds)):
        s = ds[i]
        ref = shapes[s.image_id - 1]
        assert s.task == "gres" and s.targets.expressions == ref.targets.expressions
        assert torch.equal(s.targets.boxes, ref.targets.boxes)
        assert torch.equal(s.targets.masks, ref.targets.masks)
        assert s.meta["no_target"] == (ref.meta["referents"] == "none")


def test_reasonseg_as_gres_is_scored_with_its_ignore_region(reasonseg) -> None:
    """task="gres": the Evaluator's gres metric drops the ignore region from both sides, so an
    answer that also paints the ignored pixels still scores IoU 1 (LISA's gIoU / cIoU)."""
    from vlzoo.evaluation import Evaluator
    from vlzoo.structures import Predictions

    ds = ReasonSegDataset(data_dir=reasonseg, split="val", task="gres")
    samples = [ds[i] for i in range(len(ds))]
    assert {s.task for s in samples} == {"gres"}
    preds = [Predictions(masks=(s.targets.masks.any(0) | s.targets.ignore_mask)[None]) for s in samples]
    collection = Evaluator(tasks=["gres"]).collection("gres")
    collection.update(preds, [s.targets for s in samples])
    out = collection.compute()
    assert float(out["giou"]) == 1.0 and float(out["ciou"]) == 1.0
    with pytest.raises(ValueError, match="task must be 'res' or 'gres'"):
        ReasonSegDataset(data_dir=reasonseg, split="val", task="rec")
