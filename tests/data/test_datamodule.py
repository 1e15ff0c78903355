"""The collate builds the documented sequence; the datamodule serves every split."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch

from vlzoo.data.answers import AnswerFormat, plain_box_text
from vlzoo.data.datamodule import PromptTemplate, VLDataModule
from vlzoo.data.errors import DataError
from vlzoo.data.shapes import ShapesDataset
from vlzoo.data.tokenizer import shapes_tokenizer
from vlzoo.structures import EXPRESSION_KINDS, QUERY_META_KEYS, Batch


class BoxText(AnswerFormat):
    """Shikra-style answers, enough to exercise localization tasks."""

    def localization_answer(self, sample, input_size):
        return " ".join(plain_box_text(b.tolist(), input_size) for b in sample.targets.boxes)


def _dm(**kw):
    tasks = kw.pop("tasks", ["rec", "reg", "vqa", "caption", "det", "seg", "pose", "res"])
    return VLDataModule(
        train=ShapesDataset(tasks=tasks, size=32),
        val={"val": ShapesDataset(split="val", tasks=tasks, size=8), "comp_test": ShapesDataset(split="comp_test", size=8)},
        batch_size=8,
        image_size=96,
        answer_format=BoxText(),
        **kw,
    )


def test_sequence_layout_and_masking():
    dm = _dm()
    tok = dm.tokenizer
    b = next(iter(dm.train_dataloader()))
    assert isinstance(b, Batch) and len(b) == 8
    assert b.images.shape == (8, 3, 96, 96)
    assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape
    for i in range(8):
        n = int(b.attention_mask[i].sum())
        ids = b.input_ids[i].tolist()
        assert bool(b.attention_mask[i, :n].all()) and not bool(b.attention_mask[i, n:].any())  # right pad
        assert ids[0] == tok.bos_token_id and ids[1] == tok.convert_tokens_to_ids("<image>")
        assert ids[n - 1] == tok.eos_token_id
        lab = b.labels[i].tolist()
        answer_pos = [j for j, v in enumerate(lab) if v != -100]
        assert answer_pos == list(range(answer_pos[0], n))  # answer + eos, contiguous, at the end
        assert [ids[j] for j in answer_pos] == [lab[j] for j in answer_pos]
        assert tok.decode(lab[answer_pos[0] : n - 1]).strip() == b.answers[i].lower()
        # prompt_ids: left padded and equal to the sequence before the answer
        pm = b.prompt_attention_mask[i]
        p = int(pm.sum())
        assert not bool(pm[: len(pm) - p].any())
        assert b.prompt_ids[i, len(pm) - p :].tolist() == ids[: answer_pos[0]]
        assert tok.decode(ids[2 : answer_pos[0]]) == PromptTemplate()(b.prompts[i]).lower()
    assert b.raw_images is None


def test_template_places_the_image_where_it_says():
    template = PromptTemplate(text="user: {prompt} {image} assistant:")
    assert template.split("find it") == ("user: find it", "assistant:") and not template.image_first
    assert PromptTemplate().image_first and PromptTemplate().split("x") == ("", "user: x assistant:")
    dm = _dm(template=template, tasks=["rec"])
    tok = dm.tokenizer
    b = next(iter(dm.val_dataloader()[0]))
    image_id = tok.convert_tokens_to_ids("<image>")
    for i in range(len(b)):
        p = int(b.prompt_attention_mask[i].sum())
        prompt = b.prompt_ids[i, -p:].tolist()
        at = prompt.index(image_id)
        assert prompt[0] == tok.bos_token_id and prompt.count(image_id) == 1
        assert tok.decode(prompt[1:at]) == f"user: {b.prompts[i]}".lower()
        assert tok.decode(prompt[at + 1 :]) == "assistant:"
    with pytest.raises(ValueError, match="at most once"):
        PromptTemplate(text="{image} {prompt} {image}")


def test_a_verbatim_template_is_tokenized_as_written():
    """PaliGemma's layout: no bos in front (the text writes it after the image), the trailing
    newline kept, the answer right after it without a space."""
    from tokenizers import AddedToken

    template = PromptTemplate(text="{image}<s>{prompt}\n", verbatim=True)
    assert template.split("find it") == ("", "<s>find it\n") and template("x") == "<s>x\n"
    assert repr(template) == "PromptTemplate(text='{image}<s>{prompt}\\n', verbatim=True)"
    tok = shapes_tokenizer()
    tok.add_tokens([AddedToken("\n", normalized=False)])
    dm = _dm(template=template, tasks=["rec"], tokenizer=tok)
    b = next(iter(dm.train_dataloader()))
    newline, image_id = tok.convert_tokens_to_ids("\n"), tok.convert_tokens_to_ids("<image>")
    for i in range(len(b)):
        n = int(b.attention_mask[i].sum())
        ids = b.input_ids[i, :n].tolist()
        start = next(j for j, v in enumerate(b.labels[i].tolist()) if v != -100)
        assert ids[:2] == [image_id, tok.bos_token_id] and ids[start - 1] == newline
        assert ids[start:-1] == tok(b.answers[i], add_special_tokens=False)["input_ids"]  # the answer alone (the space check: tests/backbones/test_paligemma_paradigms.py)
        assert tok.decode(ids[2 : start - 1]) == b.prompts[i].lower()


def test_targets_in_input_and_original_frames():
    dm = _dm(tasks=["reg", "seg"], keep_raw_images=True)
    b = next(iter(dm.train_dataloader()))
    rows = zip(b.targets, b.original_targets, b.transforms, b.tasks, b.prompt_boxes, b.raw_images, b.prompts, strict=True)
    for t, o, geo, task, prompt_boxes, raw, prompt in rows:
        assert t.image_size == (96, 96) and o.image_size == (64, 64) and raw.shape == (3, 64, 64)
        assert torch.allclose(geo.boxes_to_input(o.boxes), t.boxes)
        if task == "seg":
            assert t.masks.shape[-2:] == (96, 96) and o.masks.shape[-2:] == (64, 64)
            assert prompt_boxes.shape == (0, 4)
        else:
            # the query's box is carried in input pixels: the REG region is the target's box
            assert prompt_boxes.shape == (1, 4) and torch.allclose(prompt_boxes, t.boxes[:1])
            assert plain_box_text(prompt_boxes[0].tolist(), (96, 96)) in prompt


def test_the_query_travels_typed_and_meta_cannot_carry_it():
    from vlzoo.data.shapes.world import CATEGORY_NAMES

    ds = ShapesDataset(tasks=["rec", "det", "reg"], size=12, seed=3)
    samples = [ds[i] for i in range(12)]
    dm = _dm(tasks=["rec", "det", "reg"])
    collate = dm.collate()
    b = collate(samples)
    for i, s in enumerate(samples):
        assert b.category_ids[i] == s.category_id and b.category_names[i] == s.category_name
        assert b.expression_kinds[i] == s.expression_kind
        assert torch.allclose(b.prompt_boxes[i], b.transforms[i].boxes_to_input(s.prompt_boxes))
        assert not set(QUERY_META_KEYS) & set(b.meta[i])
        if s.task == "det":
            assert s.category_name == CATEGORY_NAMES[s.category_id - 1] and s.category_name in s.prompt
            assert set(s.targets.labels.tolist()) == {s.category_id} and b.category_id(i) == s.category_id
        else:
            assert s.category_id is None and s.expression_kind in EXPRESSION_KINDS
            # the evaluator's per-kind figures read the kind the collate puts into the targets
            assert b.original_targets[i].expression_kinds == [s.expression_kind]
    rows = [i for i, t in enumerate(b.tasks) if t != "rec"][:3]
    sub = b.select(rows)
    assert sub.category_ids == [b.category_ids[i] for i in rows]
    assert all(torch.equal(x, b.prompt_boxes[i]) for x, i in zip(sub.prompt_boxes, rows, strict=True))
    assert sub.expression_kinds == [b.expression_kinds[i] for i in rows]

    det = next(s for s in samples if s.task == "det")
    with pytest.raises(DataError, match=r"meta\['category'\] -> Sample.category_name"):
        collate([replace(det, meta={"category": "circle"})])
    with pytest.raises(DataError, match="must name its category: set Sample.category_id"):
        collate([replace(det, category_id=None)])
    rec = next(s for s in samples if s.task == "rec")
    with pytest.raises(DataError, match="disagrees"):
        collate([replace(rec, expression_kind="relation" if rec.expression_kind != "relation" else "ordinal")])
    with pytest.raises(ValueError, match="names no category id"):
        b.category_id(next(i for i, t in enumerate(b.tasks) if t == "rec"))


def test_eval_splits_predict_and_truncation():
    dm = _dm(max_length=12)
    loaders = dm.val_dataloader()
    assert dm.val_names == ["val", "comp_test"] and len(loaders) == 2
    b = next(iter(loaders[1]))
    assert b.input_ids.shape[1] <= 12
    dm2 = VLDataModule(predict=ShapesDataset(tasks=["rec"], size=4), image_size=64, answer_format=AnswerFormat())
    b = next(iter(dm2.predict_dataloader()))
    assert b.answers == [""] * 4  # predict tolerates answers the format cannot write
    with pytest.raises(DataError, match="no 'train' dataset \\(key data.train\\)"):
        dm2.train_dataloader()


def test_collate_is_picklable_and_shuffle_is_seeded():
    dm = _dm()
    collate = pickle.loads(pickle.dumps(dm.collate()))
    ds = ShapesDataset(tasks=["vqa"], size=4)
    assert collate([ds[i] for i in range(4)]).input_ids.shape[0] == 4
    a = [x for b in _dm(seed=1).train_dataloader() for x in b.image_ids]
    b2 = [x for b in _dm(seed=1).train_dataloader() for x in b.image_ids]
    assert a == b2 and sorted(a) == list(range(32))


def test_workers_produce_the_same_batches():
    ds = ShapesDataset(tasks=["rec", "vqa"], size=8)
    kw = dict(val=ds, eval_batch_size=4, image_size=64, answer_format=BoxText())
    b0 = list(VLDataModule(num_workers=0, **kw).val_dataloader())
    b2 = list(VLDataModule(num_workers=2, **kw).val_dataloader())
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.images, y.images) for x, y in zip(b0, b2, strict=True))


def test_missing_image_token_is_a_clear_error():
    tok = shapes_tokenizer()
    ds = ShapesDataset(tasks=["vqa"], size=2)

    class NoImage:
        def __getattr__(self, name):
            return getattr(tok, name)

        def convert_tokens_to_ids(self, token):
            return tok.unk_token_id

    dm = VLDataModule(val=ds, tokenizer=NoImage(), image_size=64)
    with pytest.raises(ValueError, match="<image>"):
        next(iter(dm.val_dataloader()))
