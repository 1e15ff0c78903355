"""The lenient answer parser of vlzoo score on a fixture of realistic model answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlzoo.scoring.answers_parser import ANSWER_FORMS, parse_answer
from vlzoo.scoring.objects_parser import parse_objects, parse_polygons

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "score" / "realistic_answers.jsonl"
CASES = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_realistic_answers(case):
    parsed = parse_answer(case["text"], case["codec"])
    if case.get("failure"):
        assert not parsed.parsed and parsed.failure
        return
    assert parsed.failure is None
    assert parsed.form == case["form"] and parsed.form in ANSWER_FORMS
    assert parsed.fractions == case.get("fractions", False)
    assert parsed.truncated == case.get("truncated", False)
    assert len(parsed.boxes) == len(case["boxes"])
    for got, want in zip(parsed.boxes, case["boxes"], strict=True):
        assert list(got) == pytest.approx(want, abs=1e-5)


def test_the_fixture_covers_every_form_and_failure():
    forms = {c.get("form") for c in CASES}
    assert set(ANSWER_FORMS) <= forms
    assert sum(bool(c.get("failure")) for c in CASES) >= 5
    assert sum(bool(c.get("truncated")) for c in CASES) >= 3
    assert {c["codec"] for c in CASES} >= {"qwen2vl", "qwen2.5vl", "florence2", "paligemma", "kosmos2", "shikra"}


def test_failure_reasons_say_what_was_wrong():
    assert "no box found" in parse_answer("nothing here", "qwen2vl").failure
    assert "empty" in parse_answer("   ", "qwen2vl").failure
    assert "fewer than one box" in parse_answer("<loc_1><loc_2>", "florence2").failure
    assert "out of range" in parse_answer("<patch_index_5000><patch_index_0001>", "kosmos2").failure


OBJECTS = Path(__file__).resolve().parents[1] / "fixtures" / "score" / "realistic_objects.jsonl"
OBJECT_CASES = [json.loads(line) for line in OBJECTS.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("case", OBJECT_CASES, ids=[f"{c['kind']}: {c['case']}" for c in OBJECT_CASES])
def test_realistic_detection_and_segmentation_answers(case):
    """Labelled boxes (det) and polygons (res) as models write them; expected values are the
    families' published quantisation, computed by hand in the fixture."""
    if case["kind"] == "det":
        parsed = parse_objects(case["text"], case["codec"])
        if case.get("failure"):
            assert not parsed.parsed and parsed.failure
            return
        assert parsed.failure is None and parsed.labels == case["labels"]
        assert parsed.skipped == case.get("skipped", 0)
        got, want = parsed.boxes, case["boxes"]
    else:
        parsed = parse_polygons(case["text"], case["codec"])
        if case.get("failure"):
            assert not parsed.parsed and parsed.failure
            return
        assert parsed.failure is None and parsed.dropped == case.get("dropped", 0)
        assert [len(p) for p in parsed.polygons] == [len(p) for p in case["polygons"]]
        got = [v for p in parsed.polygons for v in p]
        want = [v for p in case["polygons"] for v in p]
    assert parsed.form == case["form"]
    assert parsed.fractions == case.get("fractions", False)
    assert parsed.truncated == case.get("truncated", False)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert list(g) == pytest.approx(w, abs=1e-6)


def test_the_objects_fixture_covers_the_families_and_failures():
    for kind in ("det", "res"):
        cases = [c for c in OBJECT_CASES if c["kind"] == kind]
        assert sum(bool(c.get("failure")) for c in cases) >= 4
        assert sum(bool(c.get("truncated")) for c in cases) >= 1
        assert {c.get("form") for c in cases} >= {"tokens", "json", "pairs", "list"}
    assert {c["codec"] for c in OBJECT_CASES if c["kind"] == "det"} >= {"qwen2.5vl", "qwen2vl", "florence2",
                                                                        "kosmos2", "paligemma", "bins"}
    assert "too few" not in parse_polygons("<loc_1><loc_2><loc_3><loc_4>", "florence2").failure
    assert "fewer than 3 vertices" in parse_polygons("<loc_1><loc_2><loc_3><loc_4>", "florence2").failure
    assert "out of range" in parse_objects("<patch_index_5000><patch_index_0001>", "kosmos2").failure
