"""Declared comparisons: Welch's interval equals scipy's, the verdict follows the interval, and a
report's comparison table is built from known per-seed figures."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from vlzoo.study.compare import Interval, verdict, welch_interval
from vlzoo.study.report import CellResult, comparison_tables


@pytest.mark.parametrize(
    ("a", "b"),
    [([0.9, 0.95, 0.97], [0.1, 0.2, 0.6]), ([0.5, 0.52, 0.49], [0.51, 0.5, 0.53]), ([1.0, 2.0], [0.0, 0.5, 3.0, 1.0])],
)
def test_welch_interval_equals_scipys(a, b):
    got = welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert got.difference == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert got.low == pytest.approx(ref.low, abs=1e-12)
    assert got.high == pytest.approx(ref.high, abs=1e-12)


def test_interval_needs_two_seeds_and_handles_no_spread():
    assert welch_interval([0.5], [0.1, 0.2]) is None
    assert verdict(None, "a", "b") == "needs >= 2 seeds per arm"
    flat = welch_interval([0.7, 0.7], [0.2, 0.2])
    assert (flat.low, flat.high) == pytest.approx((0.5, 0.5))
    assert verdict(flat, "a", "b") == "a better"
    assert verdict(welch_interval([0.3, 0.3], [0.3, 0.3]), "a", "b") == "equal on every seed"


def test_verdict_names_an_arm_only_when_the_interval_excludes_zero():
    assert verdict(Interval(0.2, 0.05, 0.35, 3.0), "x", "y") == "x better"
    assert verdict(Interval(-0.2, -0.35, -0.05, 3.0), "x", "y") == "y better"
    assert verdict(Interval(0.2, -0.01, 0.41, 3.0), "x", "y").startswith("not resolved")
    # lower is better (a latency): the higher arm is the worse one
    assert verdict(Interval(5.0, 1.0, 9.0, 3.0), "x", "y", higher_is_better=False) == "y better"


def _cell(part, paradigm, rung, seed, acc, *, task="rec"):
    values = {"part": part, "paradigm": paradigm, "task": task, "rung": rung, "seed": str(seed)}
    return CellResult(run_id=f"{paradigm}{rung}{seed}", key=",".join(f"{k}={v}" for k, v in values.items()),
                      values=values, status="finished", metrics={f"test/{task}/acc_0.5": acc})


def test_comparison_table_rows_from_known_figures():
    a_one, b_one = [0.9, 0.95, 0.97], [0.1, 0.2, 0.6]
    a_full, b_full = [0.30, 0.32, 0.29], [0.31, 0.28, 0.33]
    results = [_cell("p", "emb", "one", s, v) for s, v in enumerate(a_one)]
    results += [_cell("p", "seq", "one", s, v) for s, v in enumerate(b_one)]
    results += [_cell("p", "emb", "full", s, v) for s, v in enumerate(a_full)]
    results += [_cell("p", "seq", "full", s, v) for s, v in enumerate(b_full)]
    # another part with the same arms is not mixed in; neither is a failed cell or a baseline
    results.append(_cell("other", "emb", "one", 0, 0.0))
    failed = _cell("p", "seq", "one", 3, 0.99)
    failed.status = "failed"
    results.append(failed)
    results.append(CellResult(run_id="base", key="b", values={"part": "p", "task": "rec", "rung": "one", "seed": "0"},
                              status="finished", metrics={"test/rec/acc_0.5": 1.0}, baseline="random_object"))
    tables = comparison_tables(results, {"rec": "acc_0.5"}, [{"axis": "paradigm", "a": "emb", "b": "seq", "part": "p"}])
    assert len(tables) == 1
    rows = {row[0]: row for row in tables[0].rows}
    assert set(rows) == {"task=rec,rung=one", "task=rec,rung=full"}
    one = rows["task=rec,rung=one"]
    assert one[2] == "0.940 ± 0.036 (0.900 / 0.950 / 0.970)"
    assert one[3].endswith("(0.100 / 0.200 / 0.600)")
    ref = stats.ttest_ind(a_one, b_one, equal_var=False).confidence_interval(0.95)
    assert one[4] == f"{sum(a_one) / 3 - sum(b_one) / 3:+.3f}"
    assert one[5] == f"[{ref.low:+.3f}, {ref.high:+.3f}]"
    assert one[6] == ("emb better" if ref.low > 0 else "not resolved (the interval contains 0)")
    assert rows["task=rec,rung=full"][6].startswith("not resolved")
    assert not math.isnan(float(one[4]))


def test_no_table_without_both_arms():
    results = [_cell("", "emb", "one", s, 0.5) for s in range(3)]
    assert comparison_tables(results, {"rec": "acc_0.5"}, [{"axis": "paradigm", "a": "emb", "b": "seq", "part": ""}]) == []


def test_a_task_mix_is_scored_per_task_next_to_the_single_task_cells():
    from vlzoo.study.report import _aggregate, _arm_label, _tables, split_mixes

    def run(task, seed, **metrics):
        values = {"part": "lumen", "task": task, "seed": str(seed)}
        return CellResult(run_id=f"{task}{seed}", key=",".join(f"{k}={v}" for k, v in values.items()),
                          values=values, status="finished", metrics=metrics)

    cells = [run("rec", s, **{"test/rec/acc_0.5": v}) for s, v in enumerate([0.60, 0.62, 0.64])]
    cells += [run("res", s, **{"test/res/ciou": v}) for s, v in enumerate([0.40, 0.41, 0.42])]
    cells += [run("rec+res", s, **{"test/rec/acc_0.5": a, "test/res/ciou": c})
              for s, (a, c) in enumerate([(0.50, 0.45), (0.52, 0.46), (0.51, 0.47)])]
    rows = split_mixes(cells)
    assert len(rows) == 12
    mix = [r for r in rows if r.values["task"] == "rec+res"]
    assert sorted({r.task for r in mix}) == ["rec", "res"] and len({r.group for r in mix}) == 2
    assert _arm_label(mix[0]) == "lumen (trained on rec+res)"
    agg = _aggregate(rows)
    assert agg["part=lumen,task=rec+res,scored=rec"]["test/rec/acc_0.5"][2] == 3  # three seeds, not six
    primary = {"rec": "acc_0.5", "res": "ciou"}
    by_task = {t.title: t for t in _tables(rows, primary)}
    assert any("part=lumen,task=rec+res,scored=rec" in row[0] for t in by_task.values() for row in t.rows)
    comparisons = [{"axis": "task", "a": "rec+res", "b": "rec", "part": "lumen"},
                   {"axis": "task", "a": "rec+res", "b": "res", "part": "lumen"}]
    (rec, res) = comparison_tables(rows, primary, comparisons)
    (row,) = rec.rows
    assert row[1] == "acc_0.5" and row[4] == f"{0.51 - 0.62:+.3f}" and row[6] == "rec better"
    (row,) = res.rows
    assert row[1] == "ciou" and row[4] == f"{0.46 - 0.41:+.3f}" and row[6] == "rec+res better"
