"""COCO and REFER readers on files written by the Shapes exporter; EXIF handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlzoo.data.coco import CocoDataset
from vlzoo.data.export import export_shapes_coco
from vlzoo.data.images import load_image
from vlzoo.data.refcoco import RefCocoDataset, load_refs
from vlzoo.data.shapes import ShapesDataset


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ds = ShapesDataset(split="val", size=6, num_objects=(2, 4))
    return ds, export_shapes_coco(ds, tmp_path_factory.mktemp("shapes_coco"))


def test_coco_reader_reproduces_the_scenes(exported):
    ds, p = exported
    coco = CocoDataset(annotation_file=p["instances"], image_dir=p["image_dir"], tasks=["det", "seg", "pose"])
    assert {s for s, *_ in coco.items} == {"det", "seg", "pose"}
    for i in range(len(coco)):
        s = coco[i]
        scene = ds.scene(s.image_id - 1)
        assert torch.equal(s.image, torch.from_numpy(scene.image))
        ids = [k for k, o in enumerate(scene.objects) if o.category + 1 == int(s.targets.labels[0])]
        boxes = torch.tensor(np.array([scene.objects[k].box for k in ids]), dtype=torch.float32)
        assert torch.equal(s.targets.boxes, boxes)
        name = s.category_name
        assert name in s.prompt or name + "s" in s.prompt or "crosses" in s.prompt
        assert s.category_id == int(s.targets.labels[0]) and set(s.targets.labels.tolist()) == {s.category_id}
        assert "category" not in s.meta
        if s.task == "seg":
            assert torch.equal(s.targets.masks, torch.from_numpy(np.stack([scene.mask(k) for k in ids])))
        if s.task == "pose":
            ref = torch.tensor(np.array([scene.objects[k].keypoints for k in ids]), dtype=torch.float32)
            assert torch.allclose(s.targets.keypoints, ref, atol=1e-3)
        assert not bool(s.targets.iscrowd.any())


def test_refer_reader_one_sample_per_sentence(exported):
    ds, p = exported
    refs = load_refs(p["refs"])
    ref_ds = RefCocoDataset(
        refs_file=p["refs"], instances_file=p["instances"], image_dir=p["image_dir"], split="val", tasks=["rec", "res", "reg"]
    )
    assert len(ref_ds) == sum(len(r["sentences"]) for r in refs)
    tasks = set()
    for i in range(len(ref_ds)):
        s = ref_ds[i]
        tasks.add(s.task)
        assert len(s.targets) == 1
        if s.task == "res":
            ys, xs = torch.nonzero(s.targets.masks[0], as_tuple=True)
            assert s.targets.boxes[0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        if s.task == "reg":
            assert s.answer == s.targets.expressions[0] and s.prompt_boxes.tolist() == [s.targets.boxes[0].tolist()]
        else:
            assert s.targets.expressions[0] in s.prompt and s.prompt_boxes.shape == (0, 4)
        assert s.category_id is None and "category" not in s.meta  # a referring prompt names no category
    assert tasks == {"rec", "res", "reg"}


def test_exif_orientation_is_honoured(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :10] = 255  # white band on the left
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    x = load_image(tmp_path / "rot.jpg")
    assert x.shape == (3, 40, 20)  # original size of the upright image
    assert x[:, :10].float().mean() > 200 and x[:, 30:].float().mean() < 50  # band now on top
