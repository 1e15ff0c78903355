"""The report's first paragraph follows the numbers; the time-to-accuracy rows follow the curves."""

from __future__ import annotations

from vlzoo.study.curves import first_reaching, mean_curve, time_to_accuracy_rows, value_at
from vlzoo.study.summary import first_paragraph

PRIMARY = {"rec": "acc_0.5"}


def test_localize_select_and_keep_follow_the_numbers():
    scores = {
        ("rec", "pixel2seq", "one"): 0.22,
        ("rec", "pixel2emb", "one"): 0.97,
        ("rec", "heatmap", "one"): 0.95,
        ("rec", "pixel2seq", "full"): 0.01,
        ("rec", "pixel2emb", "full"): 0.03,
        ("rec", "heatmap", "full"): 0.67,
    }
    retention = {
        "heatmap": {"vqa/exact_match": (0.48, 0.0)},
        "attention_keypoints": {"vqa/exact_match": (0.48, 0.48)},
    }
    text = first_paragraph(scores=scores, selection={("rec", "full"): 0.364}, retention=retention, primary=PRIMARY)
    assert "pixel2emb (0.97) and heatmap (0.95) localize a lone object" in text
    assert "pixel2seq (0.22) does not, a failed positive control" in text
    assert "heatmap (0.67) selects" in text
    assert "pixel2seq (0.01) and pixel2emb (0.03) do not" in text
    assert "random object's 0.36" in text
    assert "attention_keypoints (100%) keeps them; heatmap (0%) loses them" in text


def test_the_paragraph_changes_when_the_numbers_do():
    scores = {("rec", "a", "one"): 0.5, ("rec", "a", "full"): 0.5}
    text = first_paragraph(scores=scores, selection={("rec", "full"): 0.364}, retention={}, primary=PRIMARY)
    assert "no paradigm localizes a lone object" in text and "a (0.50) selects" in text
    scores = {("rec", "a", "one"): 0.95, ("rec", "a", "full"): 0.3}
    text = first_paragraph(scores=scores, selection={("rec", "full"): 0.364}, retention={}, primary=PRIMARY)
    assert "a (0.95) localizes" in text and "a (0.30) does not" in text and "Stage-0" not in text
    # no rung axis: the study's data is the full rung
    text = first_paragraph(scores={("rec", "a", ""): 0.4}, selection={("rec", ""): 0.364}, retention={}, primary=PRIMARY)
    assert text.startswith("On `rec` on this data") and "a (0.40) selects" in text and "lone object" not in text
    assert first_paragraph(scores={}, selection={}, retention={}, primary=PRIMARY) == ""


def test_time_to_accuracy_from_known_curves():
    seed0 = [(100, 0.2), (200, 0.55), (300, 0.8)]
    seed1 = [(100, 0.3), (200, 0.45), (300, 0.7)]
    cpu = [(100, 10.0), (200, 20.0), (300, 30.0)]
    assert mean_curve([seed0, seed1]) == [(100, 0.25), (200, 0.5), (300, 0.75)]
    assert first_reaching(mean_curve([seed0, seed1]), 0.5) == 200
    assert value_at(cpu, 150) == 15.0 and value_at(cpu, 400) is None
    rows = time_to_accuracy_rows([("a", [seed0, seed1], [cpu, cpu], 300), ("b", [[(100, 0.1), (300, 0.2)]], [cpu], None)])
    assert rows[0] == ["a", "300", "200 steps, 20 CPU s", "300 steps, 30 CPU s"]
    assert rows[1] == ["b", "300", "> budget (300 steps, best 0.200)", "> budget (300 steps, best 0.200)"]


def test_the_selection_bar_is_named_when_it_is_not_the_random_object():
    from vlzoo.study.report import CellResult, _flag, _selection_baselines

    scores = {("res", "a", "full"): 0.30, ("res", "b", "full"): 0.40}
    text = first_paragraph(scores=scores, selection={("res", "full"): (0.337, "union of every object")},
                           retention={}, primary={"res": "ciou"})
    assert "(above the union of every object's 0.34" in text
    assert "b (0.40) selects" in text and "a (0.30) does not" in text

    def row(baseline, ciou, seed=0):
        values = {"task": "res", "rung": "full", "seed": str(seed)}
        return CellResult(run_id=baseline or "cell", key=baseline, values=values, status="finished",
                          metrics={"test/res/ciou": ciou}, baseline=baseline)

    results = [row("random_object", 0.22), row("union_of_objects", 0.337), row("mean_box", 0.05)]
    bar = _selection_baselines(results)["task=res,rung=full"]["test/res/ciou"]
    assert bar[0] == 0.337  # the higher of the random object and the union, never the mean box
    cell = row("", 0.30)
    assert _flag("0.300", cell, "test/res/ciou", 0.30, _selection_baselines(results)).endswith("↓")
    assert not _flag("0.400", cell, "test/res/ciou", 0.40, _selection_baselines(results)).endswith("↓")
