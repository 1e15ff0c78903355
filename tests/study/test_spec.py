"""Study files: grid expansion, fixed overrides with grid placeholders, unsupported cells, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlzoo.study import StudyError, expand_grid, load_study


def _write(folder: Path, text: str, name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _recipes(folder: Path, names: list[str]) -> None:
    (folder / "r").mkdir(exist_ok=True)
    for n in names:
        (folder / "r" / f"{n}.yaml").write_text("# tiny\nseed: 0\n")


def test_grid_is_the_cross_product_in_file_order(tmp_path):
    _recipes(tmp_path, ["a_rec", "a_res", "b_rec", "b_res"])
    path = _write(
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
    path = _write(
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
    path = _write(
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
    path = _write(tmp_path, body)
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
    path = _write(
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
    path = _write(tmp_path, f"study:\n  name: t\n  recipe: r/a_rec.yaml\n  grid:\n    {grid}\n  budget: {{steps: 3}}\n")
    with pytest.raises(StudyError, match=message):
        load_study(path)
    path = _write(tmp_path, "study:\n  name: t\n  recipe: r/a_rec.yaml\n  grid:\n    budget: [1, 2]\n")
    with pytest.raises(StudyError, match="study.grid.budget.*not set"):
        load_study(path)
