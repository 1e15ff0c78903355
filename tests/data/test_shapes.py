"""Shapes world: determinism, unique expressions, exact geometry, splits, task contents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlzoo.data.answers import BOX_PLACEHOLDER
from vlzoo.data.shapes import (
    CATEGORY_NAMES,
    COMPOSITIONAL_HOLDOUT,
    SHAPES_CATEGORIES,
    ShapesDataset,
    referring_candidates,
    render,
    resolve,
)
from vlzoo.structures import TASKS

ALL = list(TASKS)


def _same(a, b):
    assert a.task == b.task and a.prompt == b.prompt and a.answer == b.answer
    assert torch.equal(a.image, b.image)
    assert torch.equal(a.targets.boxes, b.targets.boxes)
    for name in ("masks", "keypoints"):
        x, y = getattr(a.targets, name), getattr(b.targets, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


def test_deterministic_by_seed_and_index():
    a = ShapesDataset(tasks=ALL, size=50, seed=3)
    b = ShapesDataset(tasks=ALL, size=50, seed=3)
    for i in (0, 7, 49, 7):  # any order, any repetition
        _same(a[i], b[i])
    c = ShapesDataset(tasks=ALL, size=50, seed=4)
    assert not torch.equal(a[0].image, c[0].image)


def test_splits_are_disjoint_streams():
    imgs = {s: ShapesDataset(split=s, size=10)[0].image for s in ("train", "val", "test", "comp_test")}
    keys = list(imgs)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.equal(imgs[keys[i]], imgs[keys[j]])


def test_task_ratios_follow_weights():
    ds = ShapesDataset(tasks={"rec": 3.0, "vqa": 1.0, "det": 0.0}, size=400)
    tasks = [ds.task_of(i) for i in range(400)]
    assert "det" not in tasks
    assert 0.65 < tasks.count("rec") / 400 < 0.85
    assert all(ds[i].task == tasks[i] for i in range(20))


def test_every_expression_resolves_to_exactly_its_object():
    ds = ShapesDataset(tasks=["rec", "res", "reg"], size=300, num_objects=(2, 6), twin_prob=0.5)
    kinds = set()
    for i in range(300):
        s = ds[i]
        scene = ds.scene(i)
        ref = s.meta["ref"]
        kinds.add(ref.kind)
        assert resolve(ref, scene) == s.meta["object_ids"]
        expr = s.targets.expressions[0]
        assert expr in {render(ref, np.random.default_rng(k)) for k in range(40)} | {render(ref)}
        target = scene.objects[s.meta["object_ids"][0]]
        assert torch.equal(s.targets.boxes[0], torch.tensor(target.box, dtype=torch.float32))
    assert kinds == {"attribute", "ordinal", "superlative", "relation"}


def test_all_candidates_are_unique():
    ds = ShapesDataset(size=60, num_objects=(3, 5), twin_prob=0.6)
    for i in range(60):
        scene = ds.scene(i)
        for t in range(len(scene.objects)):
            for refs in referring_candidates(t, scene).values():
                for ref in refs:
                    assert resolve(ref, scene) == [t]


def test_masks_boxes_keypoints_are_exact():
    ds = ShapesDataset(tasks=["seg"], size=40, occlusion=0.4, num_objects=(3, 5))
    for i in range(40):
        s = ds[i]
        t = s.targets
        assert t.masks.shape[1:] == s.image.shape[1:]
        for m, box, area in zip(t.masks, t.boxes, t.areas, strict=True):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert torch.equal(box, torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32))
            assert int(m.sum()) == int(area)
        # the mask pixels carry the object's colour (no noise)
        assert len(torch.unique(s.image[:, t.masks[0]], dim=1).T) == 1
    pose = ShapesDataset(tasks=["pose"], size=60, occlusion=0.5, num_objects=(3, 5))
    vis = []
    for i in range(60):
        kp = pose[i].targets.keypoints
        assert kp.shape[1:] == (5, 3)
        x, y = kp[..., 0], kp[..., 1]
        assert bool(((x >= 0) & (x <= 64) & (y >= 0) & (y <= 64)).all())
        vis.append(kp[..., 2])
    vis = torch.cat([v.flatten() for v in vis])
    assert set(vis.tolist()) == {1.0, 2.0}  # occlusion produces occluded keypoints


def test_task_contents():
    ds = ShapesDataset(tasks=ALL, size=200)
    seen = set()
    for i in range(200):
        s = ds[i]
        seen.add(s.task)
        t = s.targets
        if s.task in ("det", "seg", "pose"):
            cat = CATEGORY_NAMES.index(s.category_name) + 1
            assert s.category_id == cat and s.prompt_boxes.shape == (0, 4) and s.expression_kind is None
            scene = ds.scene(i)
            assert len(t) == sum(o.category + 1 == cat for o in scene.objects)
            assert bool((t.labels == cat).all())
            assert (t.masks is not None) == (s.task == "seg")
            assert (t.keypoints is not None) == (s.task == "pose")
        elif s.task in ("rec", "res"):
            assert len(t) == 1 and s.answer is None and len(t.expressions) == 1
            assert s.category_id is None and s.expression_kind == t.expression_kinds[0]
            assert (t.masks is not None) == (s.task == "res")
        elif s.task == "reg":
            assert s.prompt.count(BOX_PLACEHOLDER) == 1 and s.prompt_boxes.shape == (1, 4)
            assert s.prompt_boxes[0].tolist() == t.boxes[0].tolist()
            assert s.answer == t.text == t.captions[0]
        elif s.task in ("grec", "gres"):  # a set of referents, possibly empty
            assert s.answer is None and len(t.expressions) == 1 and s.category_id is None
            assert len(t) == len(s.meta["object_ids"]) and s.meta["referents"] in ("none", "one", "several")
            assert (t.masks is not None) == (s.task == "gres")
        else:
            assert len(t) == 0 and s.answer and t.text == s.answer
            assert "[" not in s.answer
    assert seen == set(ALL)


def test_vqa_answers_are_true():
    ds = ShapesDataset(tasks=["vqa"], size=150)
    for i in range(150):
        s = ds[i]
        scene = ds.scene(i)
        q = s.prompt
        if s.meta["vqa_kind"] == "exist":
            col, cat = q.removeprefix("is there a ").removesuffix("?").split()
            truth = any(o.colour_name == col and o.category_name == cat for o in scene.objects)
            assert s.answer == ("yes" if truth else "no")
        assert s.answer in {"yes", "no"} | set(CATEGORY_NAMES) | {
            "red", "green", "blue", "yellow", "purple", "orange", "one", "two", "three", "four"
        }


def test_compositional_split():
    held = set(COMPOSITIONAL_HOLDOUT)
    train = ShapesDataset(split="train", size=200, compositional=True, num_objects=(3, 5))
    for i in range(200):
        for o in train.scene(i).objects:
            assert (o.category_name, o.colour_name) not in held
    comp = ShapesDataset(split="comp_test", size=50, tasks=["rec"])
    for i in range(50):
        s = comp[i]
        o = comp.scene(i).objects[s.meta["object_ids"][0]]
        assert (o.category_name, o.colour_name) in held


def test_categories_table_is_stable():
    assert [c["name"] for c in SHAPES_CATEGORIES] == ["circle", "square", "triangle", "diamond", "cross"]
    assert [c["id"] for c in SHAPES_CATEGORIES] == [1, 2, 3, 4, 5]
    assert all(c["keypoints"] == ["top", "bottom", "left", "right", "centre"] for c in SHAPES_CATEGORIES)


@pytest.mark.parametrize("image_size", [224])
def test_large_images_and_options(image_size):
    ds = ShapesDataset(image_size=image_size, tasks=["seg"], size=3, noise=0.05, texture=True, occlusion=0.3)
    s = ds[2]
    assert s.image.shape == (3, image_size, image_size) and s.image.dtype == torch.uint8
    assert s.targets.masks.shape[-1] == image_size


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset(split="training")
    with pytest.raises(ValueError, match="unknown tasks"):
        ShapesDataset(tasks=["recognition"])
    with pytest.raises(IndexError):
        ShapesDataset(size=3)[3]
