"""Every bad-input case: a DataError naming file and record, or a counted skip."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import warnings

import pytest

from vlzoo.data import DataError, VLDataModule
from vlzoo.data.answers import AnswerFormat, plain_box_text
from vlzoo.data.coco import CocoDataset
from vlzoo.data.export import export_shapes_coco
from vlzoo.data.refcoco import RefCocoDataset
from vlzoo.data.shapes import ShapesDataset


class BoxText(AnswerFormat):
    def localization_answer(self, sample, input_size):
        return " ".join(plain_box_text(b.tolist(), input_size) for b in sample.targets.boxes)


@pytest.fixture()
def files(tmp_path):
    ds = ShapesDataset(split="val", size=4, num_objects=(2, 3))
    return export_shapes_coco(ds, tmp_path / "export")


def _rewrite(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))
    return data


def _coco(p, **kw):
    return CocoDataset(annotation_file=p["instances"], image_dir=p["image_dir"], **kw)


def test_missing_image(files):
    (files["image_dir"] / "000001.png").unlink()
    ds = _coco(files)
    idx = [i for i, (_, image_id, _) in enumerate(ds.items) if image_id == 2]
    with pytest.raises(DataError, match=r"000001\.png.*image 2.*not found"):
        ds[idx[0]]


def test_corrupt_image(files):
    (files["image_dir"] / "000000.png").write_bytes(b"not a png at all")
    ds = _coco(files)
    with pytest.raises(DataError, match=r"000000\.png.*cannot read image"):
        ds[0]


def test_annotation_with_missing_image_or_category(files):
    data = _rewrite(files["instances"], lambda d: d["annotations"][0].update(image_id=999))
    with pytest.raises(DataError, match=rf"instances\.json annotation {data['annotations'][0]['id']}: image_id 999"):
        _coco(files)
    _rewrite(files["instances"], lambda d: d["annotations"][0].update(image_id=1, category_id=77))
    with pytest.raises(DataError, match=r"annotation 1: category_id 77"):
        _coco(files)
    ds = _coco(files, on_bad_sample="skip")
    assert ds.num_skipped == 1


@pytest.mark.parametrize(
    "bbox, message",
    [([1.0, 2.0, 0.0, 5.0], "degenerate"), ([50.0, 50.0, 40.0, 40.0], "outside"), ([math.nan, 1.0, 2.0, 2.0], "not finite")],
)
def test_bad_boxes(files, bbox, message):
    _rewrite(files["instances"], lambda d: d["annotations"][1].update(bbox=bbox))
    with pytest.raises(DataError, match=rf"annotation 2: .*{message}"):
        _coco(files)
    assert _coco(files, on_bad_sample="skip").num_skipped == 1


def test_empty_mask(files):
    def empty(d):
        d["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": [64 * 64]}  # all background

    data = _rewrite(files["instances"], empty)
    ds = _coco(files, tasks=["seg"])
    item = ds.items.index(("seg", 1, data["annotations"][0]["category_id"]))
    with pytest.raises(DataError, match=r"annotation 1: empty mask"):
        ds[item]


def test_malformed_json(files):
    files["instances"].write_text('{"images": [1, 2,')
    with pytest.raises(DataError, match=r"instances\.json: malformed JSON"):
        _coco(files)
    files["instances"].write_text('{"images": []}')
    with pytest.raises(DataError, match="not a COCO file"):
        _coco(files)


def _refs(p, **kw):
    return RefCocoDataset(refs_file=p["refs"], instances_file=p["instances"], image_dir=p["image_dir"], split="val", **kw)


def test_refs_file_for_another_dataset(files):
    refs = pickle.loads(files["refs"].read_bytes())
    for r in refs:
        r["ann_id"] += 10_000
    files["refs"].write_bytes(pickle.dumps(refs))
    with pytest.raises(DataError, match=r"refs\(shapes\)\.p ref \d+: ann_id \d+ is not in .*another dataset"):
        _refs(files)
    with pytest.raises(DataError, match="none of the 'val' refs match"):
        _refs(files, on_bad_sample="skip")


def test_refs_split_absent_and_unsafe_pickle(files):
    with pytest.raises(DataError, match=r"no refs of split 'testA'; the file has splits \['val'\]"):
        RefCocoDataset(refs_file=files["refs"], instances_file=files["instances"], image_dir=files["image_dir"], split="testA")
    files["refs"].write_bytes(pickle.dumps([{"ref": shutil.rmtree}]))
    with pytest.raises(DataError, match="not allowed"):
        _refs(files)


def test_skip_counts_bad_samples_in_one_warning(files):
    _rewrite(files["instances"], lambda d: d["annotations"][0].update(bbox=[0, 0, 0, 0]))
    (files["image_dir"] / "000001.png").unlink()
    ds = _coco(files, on_bad_sample="skip")
    n_bad_images = sum(1 for _, im, _ in ds.items if im == 2)
    dm = VLDataModule(val=ds, eval_batch_size=2, image_size=64, answer_format=BoxText(), on_bad_sample="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(dm.val_dataloader())
    ours = [w for w in caught if "skipped" in str(w.message)]
    assert len(ours) == 1 and f"skipped {n_bad_images + 1} bad sample" in str(ours[0].message)
    assert sum(len(b) for b in batches) == len(ds) - n_bad_images
    dm_err = VLDataModule(val=_coco(files, on_bad_sample="skip"), image_size=64, answer_format=BoxText())
    with pytest.raises(DataError):
        list(dm_err.val_dataloader())
