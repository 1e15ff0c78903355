"""Shapes' generalized referring option (issue 22 part 1): grec / gres items whose expression
denotes no object, one or several, in the recipe's shares, as a set of targets."""

from __future__ import annotations

import pytest

from vlzoo.data.shapes import COMPOSITIONAL_HOLDOUT, REFERENT_SETS, SetRef, ShapesDataset, resolve

SHARES = {"none": 0.25, "one": 0.5, "several": 0.25}


def test_referent_sets_are_what_the_targets_hold_and_what_the_expression_denotes():
    ds = ShapesDataset(tasks=["grec", "gres"], size=120, referents=SHARES, seed=5)
    counts = dict.fromkeys(REFERENT_SETS, 0)
    for i in range(len(ds)):
        s = ds[i]
        kind = s.meta["referents"]
        counts[kind] += 1
        assert ds.referents_of(i) == kind
        ids = s.meta["object_ids"]
        assert resolve(s.meta["ref"], ds.scene(i)) == ids
        assert len(s.targets) == len(ids) == {"none": 0, "one": 1}.get(kind, max(len(ids), 2))
        assert s.targets.boxes.shape == (len(ids), 4)
        if s.task == "gres":
            assert s.targets.masks.shape == (len(ids), 64, 64)
            assert all(bool(m.any()) for m in s.targets.masks)
        else:
            assert s.targets.masks is None
        if kind == "several":
            assert isinstance(s.meta["ref"], SetRef)
            assert s.targets.expressions[0].split()[0] in ("every", "all")
        assert s.targets.expressions[0] in s.prompt
    # the shares are the recipe's (120 draws: within a few standard deviations)
    assert 15 <= counts["none"] <= 45 and 40 <= counts["one"] <= 80 and 15 <= counts["several"] <= 45


def test_deterministic_per_seed_and_index():
    a = ShapesDataset(tasks=["gres"], size=30, referents=SHARES, seed=2)
    b = ShapesDataset(tasks=["gres"], size=30, referents=SHARES, seed=2)
    c = ShapesDataset(tasks=["gres"], size=30, referents=SHARES, seed=3)
    same = [a[i].prompt == b[i].prompt and a[i].targets.boxes.tolist() == b[i].targets.boxes.tolist() for i in range(30)]
    assert all(same)
    assert any(a[i].prompt != c[i].prompt for i in range(30))


def test_only_one_set_and_default_mix():
    none = ShapesDataset(tasks=["grec"], size=20, referents={"none": 1.0})
    assert all(len(none[i].targets) == 0 for i in range(20))
    several = ShapesDataset(tasks=["grec"], size=20, referents={"several": 1.0})
    assert all(len(several[i].targets) >= 2 for i in range(20))
    default = ShapesDataset(tasks=["grec"], size=5)
    assert default.referents == {"none": 0.2, "one": 0.6, "several": 0.2}
    lone = ShapesDataset(tasks=["grec"], rung="one", size=20)
    assert lone.referents["several"] == 0.0
    assert {len(lone[i].targets) for i in range(20)} <= {0, 1}


def test_compositional_train_names_no_held_out_pair_even_when_absent():
    ds = ShapesDataset(tasks=["grec"], size=60, referents={"none": 1.0}, compositional=True)
    for i in range(60):
        expr = ds[i].targets.expressions[0]
        for cat, col in COMPOSITIONAL_HOLDOUT:
            assert f"{col} {cat}" not in expr, expr


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(tasks=["rec"], referents={"none": 1.0}), "apply to the grec / gres tasks only"),
        (dict(tasks=["grec"], referents={"nothing": 1.0}), "unknown referent sets ['nothing']"),
        (dict(tasks=["grec"], referents={"none": 0.0, "one": 0.0}), "not all 0"),
        (dict(tasks=["grec"], rung="one", referents={"several": 0.5, "one": 0.5}), "raise num_objects"),
    ],
)
def test_bad_referents_are_named(kwargs, words):
    with pytest.raises(ValueError, match="referents") as err:
        ShapesDataset(size=4, **kwargs)
    assert words in str(err.value)


def test_empty_and_several_referents_collate_and_resize(tmp_path):
    """No-target (masks (0, H, W)) and multi-target gres samples go through the collate and the
    resize to the network input together, and the answer format writes both."""
    from vlzoo.data import VLDataModule, save_shapes_tokenizer
    from vlzoo.paradigms.codecs import BinsCodec
    from vlzoo.paradigms.pixel2seq import Pixel2SeqAnswerFormat

    save_shapes_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    fmt = Pixel2SeqAnswerFormat(codec=BinsCodec(bins=32), polygon_vertices=8)
    ds = ShapesDataset(split="val", tasks=["gres"], size=12, referents={"none": 0.5, "several": 0.5})
    tok.add_special_tokens({"additional_special_tokens": list(fmt.special_tokens)})
    dm = VLDataModule(val=ds, tokenizer=tok, answer_format=fmt, image_size=32, eval_batch_size=12, max_length=192)
    dm.setup("validate")
    loader = dm.val_dataloader()
    batch = next(iter(loader[0] if isinstance(loader, list) else loader))
    sizes = [len(t) for t in batch.targets]
    assert 0 in sizes and max(sizes) >= 2
    for t, o, answer in zip(batch.targets, batch.original_targets, batch.answers, strict=True):
        assert t.masks.shape == (len(o), 32, 32) and o.masks.shape == (len(o), 64, 64)
        assert (answer == "none") == (len(o) == 0)
