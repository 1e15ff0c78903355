"""The lenient answer parser of vlzoo score on a fixture of realistic model answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlzoo.scoring.answers_parser import ANSWER_FORMS, parse_answer

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
