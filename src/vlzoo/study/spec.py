"""Study files: a recipe pattern, a grid over slots and values, and the fairness controls.

A study file (``recipes/studies/*.yaml``)::

    # one-line description
    study:
      name: shapes_quick
      recipe: ../shapes/{paradigm}_{task}.yaml   # grid keys in braces pick the recipe file
      grid:                                      # the cross product is the set of cells
        paradigm: [pixel2seq, pixel2emb, heatmap, attention_keypoints]
        task: [rec, res]
        seed: [0, 1, 2]                          # any other key is a dotted recipe override
      fixed:                                     # applied to every cell, after the grid; a
        data.train.size: 4000                    # mapping, or a list of key=value strings
        data.train.tasks: "[{task}]"             # applied in order; {grid key} is replaced
      budget: {steps: 300}                       # steps | epochs | minutes: the same for all
      stage0: ../shapes/base_lmm.yaml            # optional: run once, its backbone checkpoint
                                                 # is every cell's backbone.checkpoint
      stage0_overrides: [trainer.max_steps=600]  # optional: overrides of the stage-0 recipe
      primary: {rec: acc_0.5, res: ciou}         # the metric the report ranks per task
      gallery: {samples: 6, split: test}
      baselines: {train_samples: 2000}           # or false: no baseline rows

Two grid keys are axes with a meaning of their own, not recipe overrides:

* ``rung: [one, attribute, spatial, full]`` - the Shapes difficulty ladder: the rung is set on
  every ``ShapesDataset`` of the cell's data slot (after ``fixed``);
* ``budget: [1, 4, 16]`` - multipliers of ``study.budget`` (every kind in it).

A cell whose recipe file does not exist, or whose paradigm does not support its task, is kept
as an *unsupported* cell: the report shows it, it is never silently dropped.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Cell", "StudySpec", "StudyError", "load_study", "expand_grid", "rung_overrides", "AXES"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
_BUDGET_KINDS = {"steps": "trainer.max_steps", "epochs": "trainer.max_epochs", "minutes": "trainer.max_time"}
#: grid keys that are axes of the protocol, not recipe overrides
RUNG_KEY = "rung"
BUDGET_KEY = "budget"
AXES = (RUNG_KEY, BUDGET_KEY)
_SHAPES_TARGETS = ("vlzoo.data.ShapesDataset", "vlzoo.data.shapes.ShapesDataset", "vlzoo.data.shapes.dataset.ShapesDataset")


class StudyError(ValueError):
    """A study file that cannot be run as written; the message names the file and key."""


@dataclass(frozen=True)
class Cell:
    """One run of a study: grid values, the recipe it resolves to and its overrides."""

    index: int
    values: dict[str, Any]
    recipe: Path
    overrides: tuple[str, ...]
    supported: bool = True
    reason: str = ""

    @property
    def key(self) -> str:
        """A stable name, e.g. ``paradigm=heatmap,task=rec,seed=0`` (grid order)."""
        return ",".join(f"{k}={v}" for k, v in self.values.items())

    @property
    def paradigm(self) -> str:
        return str(self.values.get("paradigm", ""))

    @property
    def task(self) -> str:
        return str(self.values.get("task", ""))

    @property
    def group(self) -> str:
        """The cell's key without the seed: cells of one group are averaged in the report."""
        return ",".join(f"{k}={v}" for k, v in self.values.items() if k != "seed")


@dataclass
class StudySpec:
    name: str
    path: Path
    recipe: str
    grid: dict[str, list[Any]]
    fixed: list[str] = field(default_factory=list)  # key=value overrides, {grid key} placeholders
    budget: dict[str, Any] = field(default_factory=dict)
    stage0: Path | None = None
    stage0_overrides: list[str] = field(default_factory=list)
    primary: dict[str, str] = field(default_factory=dict)
    gallery: dict[str, Any] = field(default_factory=lambda: {"samples": 6, "split": "test"})
    description: str = ""
    #: ``None``: no baselines; else ``{"train_samples": N}`` (training samples the mean box is taken over)
    baselines: dict[str, Any] | None = field(default_factory=lambda: {"train_samples": 2000})

    def budget_overrides(self, multiplier: float = 1) -> list[str]:
        """The budget as trainer overrides, every kind scaled by ``multiplier`` (the budget axis)."""
        out = []
        for kind, value in self.budget.items():
            if kind == "minutes":
                total = int(round(float(value) * multiplier * 60))
                value = f"00:{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"
            else:
                value = max(1, int(round(value * multiplier)))
            out.append(f"{_BUDGET_KINDS[kind]}={value}")
        return out


def _fail(path: Path, key: str, message: str) -> StudyError:
    return StudyError(f"study file {path}: key '{key}': {message}")


def load_study(path: str | Path) -> StudySpec:
    """Read and check a study file (nothing is built)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist (list shipped ones with `vlzoo recipes`)")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise StudyError(f"study file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("study"), dict):
        raise StudyError(f"study file {path}: expected a top-level mapping 'study:'")
    body = raw["study"]
    known = {"name", "recipe", "grid", "fixed", "budget", "stage0", "stage0_overrides", "primary", "gallery", "baselines"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise _fail(path, f"study.{unknown[0]}", f"unknown key; the keys are {sorted(known)}")
    for required in ("name", "recipe", "grid"):
        if required not in body:
            raise _fail(path, f"study.{required}", "is required")
    for key in ("name", "recipe"):
        if not isinstance(body[key], str) or not body[key].strip():
            raise _fail(path, f"study.{key}", f"must be text, got {body[key]!r}")
    for key in ("budget", "primary", "gallery"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise _fail(path, f"study.{key}", f"must be a mapping, got {type(body[key]).__name__} {body[key]!r}")
    grid = body["grid"]
    if not isinstance(grid, dict) or not grid:
        raise _fail(path, "study.grid", "must map each grid key to a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"study.grid.{key}", "must be a non-empty list")
    for name in _PLACEHOLDER.findall(str(body["recipe"])):
        if name not in grid:
            raise _fail(path, "study.recipe", f"placeholder {{{name}}} is not a grid key")
    if RUNG_KEY in grid:
        from vlzoo.data.shapes import RUNGS

        bad_rungs = [v for v in grid[RUNG_KEY] if v not in RUNGS]
        if bad_rungs:
            raise _fail(path, f"study.grid.{RUNG_KEY}", f"unknown rung(s) {bad_rungs}; the Shapes ladder is {list(RUNGS)}")
    budget = body.get("budget") or {}
    if BUDGET_KEY in grid:
        bad_mult = [v for v in grid[BUDGET_KEY] if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
        if bad_mult:
            raise _fail(path, f"study.grid.{BUDGET_KEY}", f"must be positive multipliers of study.budget, got {bad_mult}")
        if not budget:
            raise _fail(path, f"study.grid.{BUDGET_KEY}", "multiplies study.budget, which is not set (e.g. budget: {steps: 300})")
    bad = sorted(set(budget) - set(_BUDGET_KINDS))
    if bad:
        raise _fail(path, f"study.budget.{bad[0]}", f"unknown budget kind; use one of {sorted(_BUDGET_KINDS)}")
    for kind, value in budget.items():
        whole = kind != "minutes"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value <= 0:
            what = "a positive integer" if whole else "a positive number"
            raise _fail(path, f"study.budget.{kind}", f"must be {what}, got {value!r}")
    stage0 = body.get("stage0")
    stage0_path = (path.parent / stage0).resolve() if stage0 else None
    if stage0_path is not None and not stage0_path.is_file():
        raise _fail(path, "study.stage0", f"recipe {stage0_path} does not exist")
    fixed = body.get("fixed") or {}
    if isinstance(fixed, dict):
        fixed_list = [f"{k}={_override_value(v)}" for k, v in fixed.items()]
    elif isinstance(fixed, list) and all(isinstance(x, str) and "=" in x for x in fixed):
        fixed_list = list(fixed)
    else:
        raise _fail(path, "study.fixed", "must be a mapping of recipe keys to values or a list of key=value strings")
    stage0_overrides = body.get("stage0_overrides") or []
    if not isinstance(stage0_overrides, list) or not all(isinstance(x, str) and "=" in x for x in stage0_overrides):
        raise _fail(path, "study.stage0_overrides", "must be a list of key=value strings")
    baselines = body.get("baselines", {"train_samples": 2000})
    if baselines is False:
        baselines = None
    elif baselines is True or baselines is None:
        baselines = {"train_samples": 2000}
    elif not isinstance(baselines, dict) or set(baselines) - {"train_samples"}:
        raise _fail(path, "study.baselines", f"must be false or a mapping with train_samples, got {baselines!r}")
    else:
        n = baselines.get("train_samples", 2000)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise _fail(path, "study.baselines.train_samples", f"must be a positive integer, got {n!r}")
        baselines = {"train_samples": n}
    first = text.splitlines()[0] if text else ""
    return StudySpec(
        name=str(body["name"]),
        path=path.resolve(),
        recipe=str(body["recipe"]),
        grid={k: list(v) for k, v in grid.items()},
        fixed=fixed_list,
        budget=dict(budget),
        stage0=stage0_path,
        stage0_overrides=list(stage0_overrides),
        primary={str(k): str(v) for k, v in (body.get("primary") or {}).items()},
        gallery=dict(body.get("gallery") or {"samples": 6, "split": "test"}),
        description=first.lstrip("# ").strip() if first.startswith("#") else "",
        baselines=baselines,
    )


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def _fill(item: str, values: dict[str, Any]) -> str:
    """Replace ``{key}`` of grid keys in an override (other braces, e.g. YAML flow maps, stay)."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), item)


def rung_overrides(recipe: Path, overrides: list[str], rung: str) -> list[str]:
    """``<key>.rung=<rung>`` for every ShapesDataset node of the recipe's data slot (as the
    recipe resolves with ``overrides``), so a rung reaches train, val and every named test split."""
    from vlzoo.config import load_recipe

    data = load_recipe(recipe, overrides).get("data")
    out: list[str] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            if node.get("_target_") in _SHAPES_TARGETS:
                out.append(f"{key}.rung={rung}")
            for k, v in node.items():
                walk(v, f"{key}.{k}")

    walk(data, "data")
    return out


def expand_grid(spec: StudySpec, *, supports: Any = None) -> list[Cell]:
    """The cells of a study in a stable order (the grid's key order, values in listed order).

    ``supports(paradigm, task) -> (bool, reason)`` decides whether a paradigm can do a task;
    by default only a missing recipe file makes a cell unsupported.
    """
    keys = list(spec.grid)
    selecting = set(_PLACEHOLDER.findall(spec.recipe))
    cells = []
    for index, combo in enumerate(itertools.product(*(spec.grid[k] for k in keys))):
        values = dict(zip(keys, combo, strict=True))
        recipe = (spec.path.parent / spec.recipe.format(**values)).resolve()
        overrides = [f"{k}={_override_value(v)}" for k, v in values.items() if k not in selecting and k not in AXES]
        overrides += [_fill(item, values) for item in spec.fixed]
        if RUNG_KEY in values and recipe.is_file():
            overrides += rung_overrides(recipe, overrides, str(values[RUNG_KEY]))
        overrides += spec.budget_overrides(values.get(BUDGET_KEY, 1))
        supported, reason = True, ""
        if "paradigm" in values and "task" in values and supports is not None:
            supported, reason = supports(str(values["paradigm"]), str(values["task"]))
        if supported and not recipe.is_file():
            supported, reason = False, f"no recipe {recipe.name} for this cell"
        cells.append(
            Cell(
                index=index,
                values=values,
                recipe=recipe,
                overrides=tuple(overrides),
                supported=supported,
                reason=reason,
            )
        )
    return cells
