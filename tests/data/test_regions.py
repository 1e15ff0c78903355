"""Region references: a referring sample's expression becomes a crop / box reference span with the
target's box as its prompt box; the collate keeps the span and maps the box to the input."""

from __future__ import annotations

import pytest
import torch

from vlzoo.data import RegionReferences, ShapesDataset
from vlzoo.data.errors import DataError
from vlzoo.structures import reference_text


def test_the_expression_becomes_the_region_of_its_target():
    base = ShapesDataset(split="val", size=6, image_size=64, tasks=["rec", "res", "det"])
    regions = RegionReferences(dataset=base, modality="box", reference_tokens=3)
    assert len(regions) == len(base)
    seen = set()
    for i in range(len(base)):
        plain, shown = base[i], regions[i]
        seen.add(plain.task)
        if plain.task == "det":
            assert shown.prompt == plain.prompt and len(shown.prompt_boxes) == 0
            continue
        expression = plain.targets.expressions[0]
        assert shown.prompt == plain.prompt.replace(expression, reference_text("box", 3))
        assert torch.equal(shown.prompt_boxes, plain.targets.boxes[:1])
        assert torch.equal(shown.image, plain.image) and torch.equal(shown.targets.boxes, plain.targets.boxes)
    assert {"rec", "res"} <= seen


def test_the_collate_keeps_the_span_and_maps_the_box():
    from vlzoo.data import PromptTemplate, ResizeTransform, VLCollate, shapes_tokenizer
    from vlzoo.data.answers import AnswerFormat
    from vlzoo.structures import REFERENCE_END, REFERENCE_START, REFERENCE_TOKENS

    tokenizer = shapes_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [REFERENCE_START, REFERENCE_END, *REFERENCE_TOKENS.values()]})
    collate = VLCollate(tokenizer=tokenizer, answer_format=AnswerFormat(), transform=ResizeTransform(size=32),
                        template=PromptTemplate(), require_answers=False)
    sample = RegionReferences(dataset=ShapesDataset(split="val", size=1, image_size=64, tasks=["res"]))[0]
    batch = collate([sample])
    assert reference_text("crop", 4) in batch.prompts[0]
    torch.testing.assert_close(batch.prompt_boxes[0], sample.prompt_boxes / 2)  # 64 px -> the 32 px input


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'crop' or 'box'"):
        RegionReferences(dataset=[], modality="audio")

    class NoExpression:
        def __len__(self):
            return 1

        def __getitem__(self, index):
            from dataclasses import replace

            sample = ShapesDataset(split="val", size=1, image_size=64, tasks=["res"])[0]
            return replace(sample, targets=sample.targets.replace(expressions=[]))

    with pytest.raises(DataError, match="item 0 .*no expression"):
        RegionReferences(dataset=NoExpression())[0]
