"""Study files: grid expansion, fixed overrides with grid placeholders, unsupported cells, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.studies import write_study
from vlzoo.study import StudyError, expand_grid, load_study


def _recipes(folder: Path, names: list[str]) -> None:
    (folder / "r").mkdir(exist_ok=True)
    for n in names:
        (folder / "r" / f"{n}.yaml").write_text("# tiny\nseed: 0\n")


def test_grid_is_the_cross_product_in_file_order(tmp_path):
    _recipes(tmp_path, ["a_rec", "a_res", "b_rec", "b_res"])
    path = write_study(
        tmp_path,
        """# two paradigms
study:
  name: t
  recipe: r/{paradigm}_{task}.yaml
  grid:
    paradigm: [a, b]
    task: [rec, res]
    seed: [0, 1]
  fixed:
    data.train.tasks: "[{task}]"
    trainer.val_check_interval: 5
  budget: {steps: 7}
""",
    )
    spec = load_study(path)
    assert spec.description == "two paradigms"
    cells = expand_grid(spec)
    assert len(cells) == 8
    assert [c.key for c in cells[:3]] == [
        "paradigm=a,task=rec,seed=0",
        "paradigm=a,task=rec,seed=1",
        "paradigm=a,task=res,seed=0",
    ]
    c = cells[3]
    assert c.recipe == (tmp_path / "r" / "a_res.yaml").resolve()
    # grid keys that pick the recipe are not overrides; the others are, then fixed, then budget
    assert c.overrides == ("seed=1", "data.train.tasks=[res]", "trainer.val_check_interval=5", "trainer.max_steps=7")
    assert c.group == "paradigm=a,task=res"
    assert [c.index for c in cells] == list(range(8))


def test_fixed_as_ordered_list_keeps_yaml_braces(tmp_path):
    _recipes(tmp_path, ["a_rec"])
    path = write_study(
        tmp_path,
        """study:
  name: t
  recipe: r/{paradigm}_{task}.yaml
  grid: {paradigm: [a], task: [rec]}
  fixed:
    - data.test=null
    - "data.test={test: {size: 4, tasks: [{task}]}}"
  budget: {minutes: 1.5}
""",
    )
    (cell,) = expand_grid(load_study(path))
    assert cell.overrides == ("data.test=null", "data.test={test: {size: 4, tasks: [rec]}}", "trainer.max_time=00:00:01:30")


def test_missing_recipe_and_unsupported_task_are_kept_as_cells(tmp_path):
    _recipes(tmp_path, ["a_rec", "b_rec", "b_res"])
    path = write_study(
        tmp_path,
        """study:
  name: t
  recipe: r/{paradigm}_{task}.yaml
  grid: {paradigm: [a, b], task: [rec, res]}
""",
    )

    def supports(recipe: Path, task: str):
        return (False, "b cannot rec") if (recipe.stem, task) == ("b_rec", "rec") else (True, "")

    cells = {c.key: c for c in expand_grid(load_study(path), supports=supports)}
    assert len(cells) == 4
    assert not cells["paradigm=a,task=res"].supported
    assert "a_res.yaml" in cells["paradigm=a,task=res"].reason
    assert not cells["paradigm=b,task=rec"].supported
    assert cells["paradigm=b,task=rec"].reason == "b cannot rec"
    assert cells["paradigm=b,task=res"].supported


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("study:\n  name: t\n  grid: {a: [1]}\n", "study.recipe"),
        ("study:\n  name: t\n  recipe: r/{x}.yaml\n  grid: {a: [1]}\n", "placeholder {x}"),
        ("study:\n  name: t\n  recipe: r.yaml\n  grid: {a: []}\n", "study.grid.a"),
        ("study:\n  name: t\n  recipe: r.yaml\n  grid: {a: [1]}\n  budjet: {steps: 1}\n", "study.budjet"),
        ("study:\n  name: t\n  recipe: r.yaml\n  grid: {a: [1]}\n  budget: {hours: 1}\n", "study.budget.hours"),
        ("study:\n  name: t\n  recipe: r.yaml\n  grid: {a: [1]}\n  stage0: nope.yaml\n", "study.stage0"),
        ("study:\n  name: t\n  recipe: r.yaml\n  grid: {a: [1]}\n  fixed: [novalue]\n", "study.fixed"),
        ("just: [1\n", "not valid YAML"),
        ("name: t\n", "top-level mapping 'study:'"),
    ],
)
def test_bad_study_files_name_file_and_key(tmp_path, body, message):
    path = write_study(tmp_path, body)
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["shapes_quick", "shapes_full"])
def test_shipped_studies_are_valid_and_fair(name):
    from vlzoo.study.runner import StudyRun, check_fairness

    root = Path(__file__).resolve().parents[2]
    spec = load_study(root / "recipes" / "studies" / f"{name}.yaml")
    study = StudyRun(spec, tracking_uri="sqlite:///:memory:", output_dir=root / "studies" / "unused")
    assert {c.paradigm for c in study.cells} == {"pixel2seq", "pixel2emb", "heatmap", "attention_keypoints"}
    if name == "shapes_quick":
        assert all(c.supported for c in study.cells), [c.reason for c in study.cells if not c.supported]
    else:
        # every cell a paradigm cannot do is kept, with the reason
        unsupported = {c.key: c.reason for c in study.cells if not c.supported}
        assert "pixel2seq does not support seg" in unsupported["paradigm=pixel2seq,task=seg,seed=0"]
    check_fairness(study.cells)


def test_rung_and_budget_are_axes_not_overrides(tmp_path):
    shapes = Path(__file__).resolve().parents[2] / "recipes" / "shapes"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "heatmap_rec.yaml").write_text(f"_base_: {shapes / 'heatmap_rec.yaml'}\n")
    path = write_study(
        tmp_path,
        """# the ladder and the budget axis
study:
  name: t
  recipe: r/{paradigm}_{task}.yaml
  grid:
    paradigm: [heatmap]
    task: [rec]
    rung: [one, full]
    budget: [1, 4]
  fixed:
    - data.test=null
    - "data.test={test: {_target_: vlzoo.data.ShapesDataset, split: test, size: 3}, comp_test: {_target_: vlzoo.data.ShapesDataset, split: comp_test, size: 3}}"
  budget: {steps: 25}
""",
    )
    from vlzoo.config import load_recipe

    cells = expand_grid(load_study(path))
    assert [c.key for c in cells] == [
        "paradigm=heatmap,task=rec,rung=one,budget=1",
        "paradigm=heatmap,task=rec,rung=one,budget=4",
        "paradigm=heatmap,task=rec,rung=full,budget=1",
        "paradigm=heatmap,task=rec,rung=full,budget=4",
    ]
    one4 = cells[1]
    assert not any(o.startswith(("rung=", "budget=")) for o in one4.overrides)
    assert one4.overrides[-1] == "trainer.max_steps=100"
    assert cells[0].overrides[-1] == "trainer.max_steps=25"
    recipe = load_recipe(one4.recipe, list(one4.overrides))
    for key in ("data.train", "data.val", "data.test.test", "data.test.comp_test"):
        assert recipe.get(f"{key}.rung") == "one", key


@pytest.mark.parametrize(
    "grid, message",
    [
        ("rung: [one, hard]", "unknown rung"),
        ("budget: [1, 0]", "positive multipliers"),
    ],
)
def test_bad_axes_name_the_key(tmp_path, grid, message):
    _recipes(tmp_path, ["a_rec"])
    path = write_study(tmp_path, f"study:\n  name: t\n  recipe: r/a_rec.yaml\n  grid:\n    {grid}\n  budget: {{steps: 3}}\n")
    with pytest.raises(StudyError, match=message):
        load_study(path)
    path = write_study(tmp_path, "study:\n  name: t\n  recipe: r/a_rec.yaml\n  grid:\n    budget: [1, 2]\n")
    with pytest.raises(StudyError, match="study.grid.budget.*not set"):
        load_study(path)


PARTS = """# two questions in one study
study:
  name: t
  fixed: [trainer.val_check_interval=5]
  budget: {steps: 7}
  parts:
    first:
      recipe: r/{paradigm}_{task}.yaml
      grid: {paradigm: [a, b], task: [rec], seed: [0, 1]}
      compare: [{axis: paradigm, a: a, b: b}]
    second:
      recipe: r/a_{task}.yaml
      grid: {task: [res], paradigm.cycle: [true, false]}
      fixed: [data.batch_size=4]
      budget: {steps: 70}
      compare: [{axis: paradigm.cycle, a: true, b: false}]
"""


def test_parts_expand_in_file_order_with_their_own_fixed_and_budget(tmp_path):
    _recipes(tmp_path, ["a_rec", "b_rec", "a_res"])
    spec = load_study(write_study(tmp_path, PARTS))
    cells = expand_grid(spec)
    assert [c.key for c in cells] == [
        "part=first,paradigm=a,task=rec,seed=0",
        "part=first,paradigm=a,task=rec,seed=1",
        "part=first,paradigm=b,task=rec,seed=0",
        "part=first,paradigm=b,task=rec,seed=1",
        "part=second,task=res,paradigm.cycle=True",
        "part=second,task=res,paradigm.cycle=False",
    ]
    assert [c.index for c in cells] == list(range(6))
    # the part's name is no override; the study's fixed comes before the part's, then its own budget
    assert cells[0].overrides == ("seed=0", "trainer.val_check_interval=5", "trainer.max_steps=7")
    assert cells[4].overrides == ("paradigm.cycle=true", "trainer.val_check_interval=5", "data.batch_size=4",
                                  "trainer.max_steps=70")
    assert cells[4].recipe == (tmp_path / "r" / "a_res.yaml").resolve()
    assert [(c.part, c.axis, c.a, c.b) for c in spec.comparisons] == [
        ("first", "paradigm", "a", "b"), ("second", "paradigm.cycle", True, False)
    ]
    assert spec.fairness_axes == ["paradigm", "paradigm.cycle"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace("  parts:", "  recipe: r/a_rec.yaml\n  parts:"), "study.recipe"),
        (lambda s: s.replace("axis: paradigm, a: a", "axis: task, a: a"), "study.parts.first.compare[0].a"),
        (lambda s: s.replace("axis: paradigm, a: a", "axis: colour, a: a"), "study.parts.first.compare[0].axis"),
        (lambda s: s.replace("axis: paradigm, a: a, b: b", "axis: paradigm, a: a, b: a"), "nothing to compare"),
        (lambda s: s.replace("{axis: paradigm, a: a, b: b}", "{axis: seed, a: 0, b: 1}"), "compare[0].axis"),
        (lambda s: s.replace("grid: {task: [res]", "grid: {part: [x], task: [res]"), "study.parts.second.grid.part"),
        (lambda s: s.replace("      budget: {steps: 70}", "      budget: {steps: -1}"), "study.parts.second.budget.steps"),
        (lambda s: s.replace("      fixed: [data.batch_size=4]", "      fixd: [data.batch_size=4]"), "study.parts.second.fixd"),
        (lambda s: s.replace("      recipe: r/a_{task}.yaml\n", ""), "study.parts.second.recipe"),
    ],
)
def test_bad_parts_and_comparisons_name_the_key(tmp_path, edit, message):
    _recipes(tmp_path, ["a_rec", "b_rec", "a_res"])
    path = write_study(tmp_path, edit(PARTS))
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_a_compared_axis_gets_the_fairness_check(tmp_path):
    from vlzoo.study.runner import check_fairness

    shapes = Path(__file__).resolve().parents[2] / "recipes" / "shapes"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "wide.yaml").write_text(f"_base_: {shapes / 'pixel2emb_rec.yaml'}\n")
    (tmp_path / "r" / "narrow.yaml").write_text(f"_base_: {shapes / 'pixel2emb_rec.yaml'}\ndata: {{batch_size: 4}}\n")
    path = write_study(tmp_path, """study:
  name: t
  recipe: r/{arm}.yaml
  grid: {arm: [wide, narrow]}
  compare: [{axis: arm, a: wide, b: narrow}]
""")
    spec = load_study(path)
    cells = expand_grid(spec)
    check_fairness(cells)  # along the paradigm alone there is nothing to compare
    with pytest.raises(StudyError, match="differ in recipe key data.batch_size.*every arm gets the same"):
        check_fairness(cells, axes=spec.fairness_axes)
    # the difference a comparison is about is not unfair
    path.write_text(path.read_text().replace("r/{arm}.yaml", "r/wide.yaml").replace("arm: [wide, narrow]", "data.batch_size: [4, 8]")
                    .replace("axis: arm, a: wide, b: narrow", "axis: data.batch_size, a: 4, b: 8"))
    spec = load_study(path)
    check_fairness(expand_grid(spec), axes=spec.fairness_axes)


def test_a_comparison_declares_the_keys_its_arms_differ_in(tmp_path):
    from vlzoo.study.runner import check_fairness

    shapes = Path(__file__).resolve().parents[2] / "recipes" / "shapes"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "wide.yaml").write_text(f"_base_: {shapes / 'pixel2emb_rec.yaml'}\n")
    (tmp_path / "r" / "narrow.yaml").write_text(f"_base_: {shapes / 'pixel2emb_rec.yaml'}\ndata: {{batch_size: 4}}\n")
    text = """study:
  name: t
  parts:
    p:
      recipe: r/{arm}.yaml
      grid: {arm: [wide, narrow]}
      compare: [{axis: arm, a: wide, b: narrow, differ: [data.batch_size]}]
"""
    spec = load_study(write_study(tmp_path, text))
    assert spec.fairness_exemptions == {("p", "arm"): ("data.batch_size",)}
    assert spec.comparisons[0].as_dict()["differ"] == "data.batch_size"
    check_fairness(expand_grid(spec), axes=spec.fairness_axes, exempt=spec.fairness_exemptions)
    # only the declared keys: the budget may not differ as well
    (tmp_path / "r" / "narrow.yaml").write_text(
        f"_base_: {shapes / 'pixel2emb_rec.yaml'}\ndata: {{batch_size: 4}}\ntrainer: {{max_steps: 7}}\n")
    with pytest.raises(StudyError, match="differ in recipe key trainer.max_steps"):
        check_fairness(expand_grid(spec), axes=spec.fairness_axes, exempt=spec.fairness_exemptions)
    # the declaration of another part does not reach this one
    (tmp_path / "r" / "narrow.yaml").write_text(f"_base_: {shapes / 'pixel2emb_rec.yaml'}\ndata: {{batch_size: 4}}\n")
    with pytest.raises(StudyError, match="differ in recipe key data.batch_size"):
        check_fairness(expand_grid(spec), axes=spec.fairness_axes, exempt={("q", "arm"): ("data.batch_size",)})
    with pytest.raises(StudyError, match=r"study.parts.p.compare\[0\].differ': must be a list of recipe keys"):
        load_study(write_study(tmp_path, text.replace("differ: [data.batch_size]", "differ: data.batch_size")))
    with pytest.raises(StudyError, match=r"compare\[0\]': must be a mapping with axis, a, b and optionally differ"):
        load_study(write_study(tmp_path, text.replace("differ: [data.batch_size]", "differs: [data.batch_size]")))


def test_shipped_claims_study_is_valid_and_fair():
    from vlzoo.study.runner import StudyRun, check_fairness

    root = Path(__file__).resolve().parents[2]
    spec = load_study(root / "recipes" / "studies" / "shapes_claims.yaml")
    study = StudyRun(spec, tracking_uri="sqlite:///:memory:", output_dir=root / "studies" / "unused")
    assert all(c.supported for c in study.cells), [c.reason for c in study.cells if not c.supported]
    assert {c.values["part"] for c in study.cells} == {p.name for p in spec.parts}
    check_fairness(study.cells, axes=spec.fairness_axes, exempt=spec.fairness_exemptions, declared=spec.compared_axes)
    assert spec.comparisons


def test_a_null_grid_value_is_yaml_null_in_the_recipe(tmp_path):
    from vlzoo.config import load_recipe

    shapes = Path(__file__).resolve().parents[2] / "recipes" / "shapes"
    path = write_study(tmp_path, f"""study:
  name: t
  recipe: {shapes / 'pixel2emb_rec.yaml'}
  grid: {{paradigm.attention_target: [null, cross]}}
""")
    off, on = expand_grid(load_study(path))
    assert "paradigm.attention_target=null" in off.overrides
    assert load_recipe(off.recipe, list(off.overrides)).get("paradigm.attention_target") is None
    assert load_recipe(on.recipe, list(on.overrides)).get("paradigm.attention_target") == "cross"


def test_a_task_mix_fills_in_as_a_list_and_needs_every_task_supported(tmp_path):
    from vlzoo.study.runner import check_fairness, paradigm_supports

    shapes = Path(__file__).resolve().parents[2] / "recipes" / "shapes"
    text = f"""study:
  name: t
  parts:
    lumen:
      recipe: {shapes / 'heatmap_res_textfirst.yaml'}
      grid: {{task: [rec, rec+res]}}
      fixed: ["data.train.tasks=[{{task}}]", "paradigm.tasks=[{{task}}]", "evaluator.tasks=[{{task}}]"]
      compare: [{{axis: task, a: rec+res, b: rec}}]
    other:
      recipe: {shapes / 'heatmap_res_textfirst.yaml'}
      grid: {{task: [rec, res]}}
      fixed: ["data.train.tasks=[{{task}}]", "paradigm.tasks=[{{task}}]", "evaluator.tasks=[{{task}}]"]
"""
    spec = load_study(write_study(tmp_path, text))
    single, mix, *_ = expand_grid(spec, supports=paradigm_supports)
    assert "data.train.tasks=[rec, res]" in mix.overrides and "paradigm.tasks=[rec, res]" in mix.overrides
    assert "data.train.tasks=[rec]" in single.overrides and mix.supported
    # the arms differ in their data and evaluator: that has to be declared ...
    with pytest.raises(StudyError, match="differ in recipe key data.train"):
        check_fairness(expand_grid(spec), axes=spec.fairness_axes, exempt=spec.fairness_exemptions,
                       declared=spec.compared_axes)
    spec = load_study(write_study(tmp_path, text.replace("b: rec}", "b: rec, differ: [data.train, evaluator]}")))
    # ... and a part that only varies its task (no comparison along it) is not held to it
    check_fairness(expand_grid(spec), axes=spec.fairness_axes, exempt=spec.fairness_exemptions,
                   declared=spec.compared_axes)
    # a mix with a task the paradigm lacks is unsupported, and says which
    spec = load_study(write_study(tmp_path, text.replace("rec+res", "rec+reg")))
    mix = expand_grid(spec, supports=paradigm_supports)[1]
    assert not mix.supported and "reg" in mix.reason
