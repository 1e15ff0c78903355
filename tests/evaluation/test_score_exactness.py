"""vlzoo score is exact: the ground truth written by each family's codec in the family's frame
scores exactly 1.0; the same text declared in a wrong frame scores lower and is warned about."""

from __future__ import annotations

import pytest
import torch

from vlzoo.data.frames import FAMILY_FRAMES, make_frame
from vlzoo.data.shapes import ShapesDataset
from vlzoo.paradigms.codecs import (
    CODECS,
    Kosmos2Codec,
    Qwen2VLCodec,
    Qwen25VLCodec,
    ShikraCodec,
    make_codec,
)
from vlzoo.scoring.answers_parser import codec_for_scoring, parse_answer
from vlzoo.scoring.score import FAR_BETTER_GAIN, Answer, Reference, reference_samples, score_answers

#: the frame each family is wrongly declared in: the mistakes users make
WRONG = {
    "qwen2vl": "original",  # 0..1000 read as pixels
    "qwen2.5vl": "normalized_1000",  # resized-input pixels read as Qwen2-VL's 0..1000
    "paligemma": "pad_to_square",
    "florence2": "pad_to_square",
    "kosmos2": "pad_to_square",
    "shikra": "normalized_1",  # of the image instead of the padded square
    "bins": "original",
}
WIDE = (64, 112)  # a Shapes scene padded left and right: H x W


@pytest.fixture(scope="module")
def square_refs() -> list[Reference]:
    return reference_samples(ShapesDataset(split="val", size=48, image_size=64, tasks=["rec"], seed=3))


@pytest.fixture(scope="module")
def wide_refs(square_refs) -> list[Reference]:
    """The same scenes in a 64 x 112 image (24 px of padding each side), so that the padded
    square differs from the image."""
    out = []
    for ref in square_refs:
        boxes = ref.target.boxes + torch.tensor([24.0, 0.0, 24.0, 0.0])
        out.append(Reference(ids=dict(ref.ids), target=ref.target.replace(boxes=boxes, image_size=WIDE)))
    return out


def family_text(family: str, boxes: torch.Tensor, size: tuple[int, int]) -> str:
    """The boxes as the family's model writes them: its codec, in its frame."""
    frame = make_frame(FAMILY_FRAMES[family])
    if family == "qwen2vl":
        return Qwen2VLCodec().encode(boxes, size)  # the codec's own 0..1000 of the image
    if family == "qwen2.5vl":
        return Qwen25VLCodec().encode(frame.from_original(boxes, size), frame.reference_size(size))
    codec = make_codec(family)
    pixels = frame.transform(size).boxes_to_input(boxes)  # into the reference image
    return codec.encode(pixels, frame.reference_size(size))


def answers_for(family: str, refs: list[Reference]) -> list[Answer]:
    return [Answer(line=i + 1, key=("image_id", r.ids["image_id"]), text=family_text(family, r.target.boxes[:1],
                                                                                      r.target.image_size))
            for i, r in enumerate(refs)]


def test_every_codec_has_a_family_frame():
    assert set(FAMILY_FRAMES) == set(CODECS)


@pytest.mark.parametrize("family", sorted(CODECS))
@pytest.mark.parametrize("layout", ["square", "wide"])
def test_ground_truth_in_the_family_frame_scores_exactly_one(family, layout, square_refs, wide_refs):
    refs = square_refs if layout == "square" else wide_refs
    report = score_answers(answers_for(family, refs), refs, codec=family)
    assert report.frame == FAMILY_FRAMES[family]
    assert report.metrics["acc_0.5"] == 1.0
    assert report.parse_failures == 0 and report.missing == 0
    assert not report.warnings
    if family in ("qwen2vl", "qwen2.5vl", "florence2", "paligemma"):  # fine quantisation
        assert report.metrics["miou"] > 0.9


@pytest.mark.parametrize("family", sorted(CODECS))
def test_the_wrong_frame_scores_lower_and_warns(family, wide_refs):
    answers = answers_for(family, wide_refs)
    report = score_answers(answers, wide_refs, codec=family, frame=WRONG[family])
    right = report.by_frame[FAMILY_FRAMES[family]]["acc_0.5"]
    assert right == 1.0
    assert report.metrics["acc_0.5"] <= right - FAR_BETTER_GAIN
    (warning,) = [w for w in report.warnings if "far better" in w]
    assert f"declared '{WRONG[family]}'" in warning
    # the warned frame fits as well as the family's own (for normalised answers several frames are one)
    named = warning.split("frame '")[1].split("'")[0]
    assert report.by_frame[named]["acc_0.5"] == 1.0
    assert report.to_dict()["warnings"] == report.warnings
    assert "WARNING: the answers fit frame" in report.format()


@pytest.mark.parametrize("family", sorted(CODECS))
def test_reading_agrees_with_the_codecs_own_decode(family, wide_refs):
    """The parser + frame give what the family codec's decode gives in the family's frame."""
    frame = make_frame(FAMILY_FRAMES[family])
    reader = codec_for_scoring(family)
    for ref in wide_refs[:16]:
        size = ref.target.image_size
        text = family_text(family, ref.target.boxes[:1], size)
        parsed = parse_answer(text, reader)
        boxes = torch.tensor(parsed.boxes, dtype=torch.float64)
        ours = frame.fractions_to_original(boxes, size) if parsed.fractions else frame.to_original(boxes, size)
        if family == "qwen2vl":
            theirs = Qwen2VLCodec().decode(text, size)
        elif family == "qwen2.5vl":
            theirs = frame.transform(size).boxes_to_original(Qwen25VLCodec().decode(text, frame.reference_size(size)))
        else:
            codec = make_codec(family)
            decoded = codec.decode(text, frame.reference_size(size))
            theirs = frame.transform(size).boxes_to_original(decoded)
        # Florence-2's post-processor truncates to whole pixels; vlzoo score keeps the bin centre
        assert torch.allclose(ours, theirs.float(), atol=1.0 if family == "florence2" else 1e-3), family


def test_shikra_and_kosmos_write_what_the_codecs_write(wide_refs):
    ref = wide_refs[0]
    size = ref.target.image_size
    text = family_text("shikra", ref.target.boxes[:1], size)
    assert text == ShikraCodec().encode(make_frame("pad_to_square").from_original(ref.target.boxes[:1], size),
                                        (112, 112))
    assert text.startswith("[") and "<" not in text
    assert family_text("kosmos2", ref.target.boxes[:1], size).startswith(Kosmos2Codec.OBJECT)


def test_unanswered_and_unparsed_samples_are_misses(square_refs):
    answers = answers_for("qwen2.5vl", square_refs)
    answers = answers[: len(answers) // 2]
    answers[0] = Answer(line=1, key=answers[0].key, text="I cannot see that object.")
    report = score_answers(answers, square_refs, codec="qwen2.5vl")
    half = len(square_refs) // 2
    assert report.missing == len(square_refs) - half and report.parse_failures == 1
    assert report.metrics["acc_0.5"] == pytest.approx((half - 1) / len(square_refs))
    assert report.failure_examples[0]["where"] == "line 1"
    assert any("have no answer" in w for w in report.warnings)
