"""The Shapes difficulty ladder: each rung produces what it promises, and ``full`` (the default)
is bit-identical to the data before the ladder existed."""

from __future__ import annotations

import hashlib

import pytest

from vlzoo.data.shapes import RUNGS, ShapesDataset, resolve
from vlzoo.structures import EXPRESSION_KINDS, TASKS

SPATIAL_WORDS = {
    "left", "right", "top", "bottom", "above", "below", "under", "leftmost", "rightmost", "topmost",
    "bottommost", "largest", "biggest", "smallest", "first", "second", "third", "fourth", "from",
}  # fmt: skip


def _digest(ds: ShapesDataset, n: int) -> str:
    """Everything a sample held before the ladder (the new ``expression_kinds`` left out)."""
    h = hashlib.sha256()
    for i in range(n):
        s = ds[i]
        h.update(s.task.encode())
        h.update(s.prompt.encode())
        h.update(str(s.answer).encode())
        h.update(s.image.numpy().tobytes())
        t = s.targets
        for name in ("boxes", "labels", "areas", "masks", "keypoints"):
            value = getattr(t, name)
            h.update(name.encode())
            if value is not None:
                h.update(value.numpy().tobytes())
        h.update(repr(t.expressions).encode())
        h.update(repr(t.captions).encode())
        h.update(str(t.text).encode())
        h.update(repr(_meta_before_the_query(ds, i, s)).encode())
    return h.hexdigest()


def _meta_before_the_query(ds: ShapesDataset, i: int, s) -> dict:
    """The sample's ``meta`` as it was before the query moved into typed fields (issue 17): the
    category name and the prompt boxes were in it."""
    meta = dict(s.meta)
    if s.category_name is not None:  # det / seg / pose
        return {"category": s.category_name, **meta}
    if "object_ids" in meta:  # rec / res / reg: the referred object's category
        old = {"category": ds.scene(i).objects[meta["object_ids"][0]].category_name, **meta}
        if s.prompt_boxes.numel():
            old["prompt_boxes"] = s.prompt_boxes.tolist()
        return old
    return meta


#: the tasks that existed when the digests were computed (grec / gres came later, issue 22): a
#: recipe naming these tasks keeps its data bit for bit
TASKS_BEFORE = ("rec", "res", "det", "seg", "pose", "reg", "caption", "vqa")
assert set(TASKS_BEFORE) <= set(TASKS)

# digests computed with the code before the ladder (commit 37550d8)
BEFORE = {
    "rec_test": (dict(split="test", tasks=["rec"], size=60), "e6241bffef58814425a50452c6cc8d602e40688d03b05065e26950b715f0b4da"),
    "res_train": (dict(split="train", tasks=["res"], size=40), "51fcadb8b05a03e927060de2fab83cc6c7b4fa3233f85e839742db2998326d33"),
    "all_val": (dict(split="val", tasks=list(TASKS_BEFORE), size=60, seed=3), "c36dbbe7420a6def4ea032e79296aa0b1549c41166567feaa2b41633ad110291"),
    "comp": (dict(split="comp_test", tasks=["rec", "reg"], size=30), "15ccc4721b47d9cf8fa2b8b632abd1218b6ec9853c77fefdd3f02df62cbf7f84"),
    "one_obj": (dict(split="train", tasks=["rec"], num_objects=(1, 1), size=30), "4d4cbf897d284ffc04264492ebd4de65274066067d822139da428a6b57776300"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BEFORE))
def test_full_rung_is_bit_identical_to_before_the_ladder(name):
    kwargs, digest = BEFORE[name]
    assert _digest(ShapesDataset(**kwargs), kwargs["size"]) == digest
    assert _digest(ShapesDataset(rung="full", **kwargs), kwargs["size"]) == digest


def test_one_rung_has_exactly_one_object_and_equals_full_with_one_object():
    ds = ShapesDataset(rung="one", split="test", tasks=list(TASKS_BEFORE), size=40)
    for i in range(40):
        assert len(ds.scene(i).objects) == 1
        s = ds[i]
        if s.task in ("rec", "res", "reg"):
            assert s.targets.expression_kinds == ["attribute"]
    same = ShapesDataset(split="test", tasks=list(TASKS_BEFORE), size=40, num_objects=(1, 1))
    assert _digest(ds, 40) == _digest(same, 40)


@pytest.mark.parametrize("task", ["rec", "res", "reg"])
def test_attribute_rung_names_attributes_only_and_refers_uniquely(task):
    ds = ShapesDataset(rung="attribute", split="val", tasks=[task], size=60)
    several = 0
    for i in range(60):
        s = ds[i]
        scene = ds.scene(i)
        several += len(scene.objects) > 1
        ref = s.meta["ref"]
        assert ref.kind == "attribute" and s.targets.expression_kinds == ["attribute"]
        expr = s.targets.expressions[0]
        assert not SPATIAL_WORDS & set(expr.split()), expr
        assert resolve(ref, scene) == s.meta["object_ids"]
        assert len(s.meta["object_ids"]) == 1
    assert several == 60  # 2-4 objects on every image


def test_spatial_rung_uses_only_spatial_kinds_and_every_one_of_them():
    ds = ShapesDataset(rung="spatial", split="train", tasks=["rec", "res"], size=120)
    seen = set()
    for i in range(120):
        s = ds[i]
        kind = s.meta["ref"].kind
        assert kind in ("ordinal", "superlative", "relation") and s.targets.expression_kinds == [kind]
        assert resolve(s.meta["ref"], ds.scene(i)) == s.meta["object_ids"]
        seen.add(kind)
    assert seen == {"ordinal", "superlative", "relation"}


def test_rungs_share_the_world_and_the_splits():
    for rung in RUNGS:
        ds = ShapesDataset(rung=rung, split="test", tasks=["det", "caption"], size=8, image_size=48)
        assert ds[0].image.shape == (3, 48, 48) and len(ds) == 8
    # the non-referring tasks of several-object rungs are the full rung's samples
    kw = dict(split="test", tasks=["det", "caption", "vqa"], size=20)
    assert _digest(ShapesDataset(rung="attribute", **kw), 20) == _digest(ShapesDataset(**kw), 20)


def test_full_rung_draws_every_kind():
    ds = ShapesDataset(split="test", tasks=["rec"], size=80)
    assert {ds[i].targets.expression_kinds[0] for i in range(80)} == set(EXPRESSION_KINDS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rung="hard"), "unknown rung 'hard'"),
        (dict(rung="one", num_objects=(2, 4)), "rung 'one' has one object per image"),
        (dict(rung="spatial", num_objects=(1, 3)), "rung 'spatial' needs several objects"),
    ],
)
def test_bad_rung_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesDataset(**kwargs)
