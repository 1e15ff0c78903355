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

Two grid keys are axes with a meaning of their own, not recipe overrides (and ``task``, when the
recipe pattern does not name it, only labels the cells of a recipe made for that task):

* ``rung: [one, attribute, spatial, full]`` - the Shapes difficulty ladder: the rung is set on
  every ``ShapesDataset`` of the cell's data slot (after ``fixed``);
* ``budget: [1, 4, 16]`` - multipliers of ``study.budget`` (every kind in it).

A ``task`` value may be a **task mix**, ``rec+res``: one model trained and scored on both (in
``fixed``, ``[{task}]`` fills in as ``[rec, res]``). The report scores a mix cell on each of
its tasks, next to the single-task cells (Lumen's claim: ``compare: [{axis: task, a: rec+res,
b: rec}, ...]``).

A cell whose recipe file does not exist, or whose paradigm does not support its task, is kept
as an *unsupported* cell: the report shows it, it is never silently dropped.

**Comparisons.** ``compare:`` declares the differences the study is run to answer; the report
gives each one a row per setting: both arms' mean +/- std over seeds, every seed's figure, the
difference and its 95 % confidence interval (Welch's t), and a verdict that says whether the
difference is real at that many seeds::

      compare:
        - {axis: paradigm, a: pixel2emb, b: pixel2seq}    # a and b are values of grid.<axis>

**Parts.** A study that answers several questions, each with its own recipes and grid, lists
them under ``parts:`` instead of one ``recipe`` / ``grid``; every part has ``recipe`` and
``grid`` and may have ``fixed`` (applied after the study's), ``budget`` (instead of the
study's) and ``compare``.  All parts share the stage 0, the primary metrics, the baselines and
one report; a cell's key starts with ``part=<name>``::

      parts:
        nextchat:
          recipe: ../shapes/{paradigm}_rec.yaml
          grid: {paradigm: [pixel2emb, pixel2seq], rung: [one, full], seed: [0, 1, 2]}
          compare: [{axis: paradigm, a: pixel2emb, b: pixel2seq}]
        heatmap:
          recipe: ../shapes/heatmap_rec_textfirst.yaml
          grid: {rung: [full], seed: [0, 1, 2]}
          budget: {steps: 6000}

**Zero-shot cells.** ``zero_shot: true`` on a part (or on a study without parts) makes its
cells off-the-shelf models, used as they are: nothing is trained (no ``fit``, no budget, no
stage 0 checkpoint), the recipe's Pixel2Seq paradigm runs the model's native generation with
the recipe's prompt and codec on the cell's test splits, and the same harness scores it::

        released:
          zero_shot: true
          recipe: ../gpu/pixel2seq_{model}_refcoco.yaml
          grid: {model: [qwen2vl, qwen25vl], task: [rec]}
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Cell",
    "task_mix",
    "MIX_SEPARATOR",
    "Comparison",
    "StudyPart",
    "StudySpec",
    "StudyError",
    "load_study",
    "expand_grid",
    "rung_overrides",
    "AXES",
    "PART_KEY",
    "ZERO_SHOT_KEY",
    "BACKBONE_FROM_KEY",
]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
_BUDGET_KINDS = {"steps": "trainer.max_steps", "epochs": "trainer.max_epochs", "minutes": "trainer.max_time"}
#: grid keys that are axes of the protocol, not recipe overrides
RUNG_KEY = "rung"
BUDGET_KEY = "budget"
#: the cell's task (rec, res, ...): a recipe-pattern placeholder, else only the cell's label
TASK_KEY = "task"
#: joins the tasks of a task mix in a ``task`` grid value (``rec+res``)
MIX_SEPARATOR = "+"
#: the value of a part's cells: the part's name (``study.parts``)
PART_KEY = "part"
AXES = (RUNG_KEY, BUDGET_KEY, PART_KEY)
#: the key of a part (or of a study without parts) whose cells are used as they are, untrained
ZERO_SHOT_KEY = "zero_shot"
#: a part whose cells start from the trained backbone of another part's cell with the same seed
BACKBONE_FROM_KEY = "backbone_from"
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
    #: an off-the-shelf model, tested as it is (``zero_shot: true`` on its part): no training
    zero_shot: bool = False
    #: the part whose cell of this seed gives this cell its starting backbone (``backbone_from``)
    backbone_from: str = ""

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


@dataclass(frozen=True)
class Comparison:
    """A declared difference: grid value ``a`` against ``b`` of grid key ``axis``, every other
    grid value (but the seed) equal, within one part."""

    axis: str
    a: Any
    b: Any
    part: str = ""
    #: recipe keys the two arms are meant to differ in besides the axis itself (e.g. the data of
    #: a text and a spoken arm), exempt from the fairness check; every other key must be equal
    differ: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = {"axis": self.axis, "a": str(self.a), "b": str(self.b), "part": self.part}
        if self.differ:
            out["differ"] = ",".join(self.differ)
        return out


@dataclass
class StudyPart:
    """One recipe pattern and grid of a study (a study without ``parts`` has one, named ``""``)."""

    name: str
    recipe: str
    grid: dict[str, list[Any]]
    fixed: list[str] = field(default_factory=list)  # after the study's own fixed
    budget: dict[str, Any] = field(default_factory=dict)
    compare: list[Comparison] = field(default_factory=list)
    #: the part's cells are off-the-shelf models, tested as they are (no budget, no stage 0)
    zero_shot: bool = False
    #: the part whose cell of the same seed gives each cell its starting backbone (not stage 0)
    backbone_from: str = ""

    def budget_overrides(self, multiplier: float = 1) -> list[str]:
        return [] if self.zero_shot else _budget_overrides(self.budget, multiplier)


def _budget_overrides(budget: dict[str, Any], multiplier: float) -> list[str]:
    out = []
    for kind, value in budget.items():
        if kind == "minutes":
            total = int(round(float(value) * multiplier * 60))
            value = f"00:{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"
        else:
            value = max(1, int(round(value * multiplier)))
        out.append(f"{_BUDGET_KINDS[kind]}={value}")
    return out


@dataclass
class StudySpec:
    name: str
    path: Path
    recipe: str  # "" for a study with parts
    grid: dict[str, list[Any]]  # {} for a study with parts
    fixed: list[str] = field(default_factory=list)  # key=value overrides, {grid key} placeholders
    budget: dict[str, Any] = field(default_factory=dict)
    stage0: Path | None = None
    stage0_overrides: list[str] = field(default_factory=list)
    primary: dict[str, str] = field(default_factory=dict)
    gallery: dict[str, Any] = field(default_factory=lambda: {"samples": 6, "split": "test"})
    description: str = ""
    #: ``None``: no baselines; else ``{"train_samples": N}`` (training samples the mean box is taken over)
    baselines: dict[str, Any] | None = field(default_factory=lambda: {"train_samples": 2000})
    #: the recipe patterns and grids; a study without ``parts`` has one part named ``""``
    parts: list[StudyPart] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.parts:
            self.parts = [StudyPart(name="", recipe=self.recipe, grid=self.grid, budget=self.budget)]

    @property
    def trains(self) -> bool:
        """Whether any part trains (a study of zero-shot parts only needs no stage 0)."""
        return any(not part.zero_shot for part in self.parts)

    @property
    def comparisons(self) -> list[Comparison]:
        return [c for part in self.parts for c in part.compare]

    @property
    def fairness_axes(self) -> list[str]:
        """The grid keys along which cells must differ in nothing else: the paradigm and every
        compared axis."""
        return list(dict.fromkeys(["paradigm", *(c.axis for c in self.comparisons)]))

    @property
    def compared_axes(self) -> set[tuple[str, str]]:
        """``(part, axis)`` of every declared comparison: a compared axis is checked for fairness
        within the part that compares along it (another part may vary it freely, e.g. its task)."""
        return {(c.part, c.axis) for c in self.comparisons}

    @property
    def fairness_exemptions(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """``(part, axis) -> recipe keys`` a declared comparison says its arms differ in."""
        out: dict[tuple[str, str], tuple[str, ...]] = {}
        for c in self.comparisons:
            if c.differ:
                out[(c.part, c.axis)] = tuple(dict.fromkeys([*out.get((c.part, c.axis), ()), *c.differ]))
        return out

    def budget_overrides(self, multiplier: float = 1) -> list[str]:
        """The budget as trainer overrides, every kind scaled by ``multiplier`` (the budget axis)."""
        return _budget_overrides(self.budget, multiplier)


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
    known = {
        "name", "recipe", "grid", "fixed", "budget", "stage0", "stage0_overrides", "primary", "gallery", "baselines",
        "compare", "parts", ZERO_SHOT_KEY,
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise _fail(path, f"study.{unknown[0]}", f"unknown key; the keys are {sorted(known)}")
    if "parts" in body:
        for key in ("recipe", "grid", "compare", ZERO_SHOT_KEY):
            if key in body:
                raise _fail(path, f"study.{key}", "a study with parts sets it in each part (study.parts.<name>.{key})")
    else:
        for required in ("recipe", "grid"):
            if required not in body:
                raise _fail(path, f"study.{required}", "is required (or list study.parts)")
    if "name" not in body:
        raise _fail(path, "study.name", "is required")
    if not isinstance(body["name"], str) or not body["name"].strip():
        raise _fail(path, "study.name", f"must be text, got {body['name']!r}")
    for key in ("budget", "primary", "gallery"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise _fail(path, f"study.{key}", f"must be a mapping, got {type(body[key]).__name__} {body[key]!r}")
    budget = _read_budget(path, "study.budget", body.get("budget") or {})
    fixed_list = _read_fixed(path, "study.fixed", body.get("fixed") or {})
    if "parts" in body:
        parts_raw = body["parts"]
        if not isinstance(parts_raw, dict) or not parts_raw:
            raise _fail(path, "study.parts", "must map each part's name to its recipe, grid, fixed, budget and compare")
        parts = []
        for name, part in parts_raw.items():
            where = f"study.parts.{name}"
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise _fail(path, where, "a part's name is letters, digits, '_' and '-'")
            if not isinstance(part, dict):
                raise _fail(path, where, f"must be a mapping with recipe and grid, got {part!r}")
            extra = sorted(set(part) - {"recipe", "grid", "fixed", "budget", "compare", ZERO_SHOT_KEY, BACKBONE_FROM_KEY})
            if extra:
                raise _fail(path, f"{where}.{extra[0]}",
                            "unknown key; a part has recipe, grid, fixed, budget, compare, zero_shot, backbone_from")
            for required in ("recipe", "grid"):
                if required not in part:
                    raise _fail(path, f"{where}.{required}", "is required")
            if part.get("budget") is not None and not isinstance(part["budget"], dict):
                raise _fail(path, f"{where}.budget", f"must be a mapping, got {part['budget']!r}")
            part_budget = _read_budget(path, f"{where}.budget", part["budget"]) if part.get("budget") else dict(budget)
            parts.append(_read_part(path, where, name, part, part_budget, _read_fixed(path, f"{where}.fixed", part.get("fixed") or {})))
            source = part.get(BACKBONE_FROM_KEY)
            if source is not None:
                parts[-1].backbone_from = _read_backbone_from(path, where, source, parts)
        recipe, grid = "", {}
    else:
        parts = [_read_part(path, "study", "", body, budget, [])]
        recipe, grid = parts[0].recipe, parts[0].grid
    stage0 = body.get("stage0")
    if stage0:
        if all(part.zero_shot for part in parts):
            raise _fail(path, "study.stage0", "every cell is zero-shot (used as it is), so no cell would start "
                        "from the stage-0 checkpoint; remove study.stage0 or the zero_shot key")
    stage0_path = (path.parent / stage0).resolve() if stage0 else None
    if stage0_path is not None and not stage0_path.is_file():
        raise _fail(path, "study.stage0", f"recipe {stage0_path} does not exist")
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
        recipe=recipe,
        grid=grid,
        fixed=fixed_list,
        budget=dict(budget),
        stage0=stage0_path,
        stage0_overrides=list(stage0_overrides),
        primary={str(k): str(v) for k, v in (body.get("primary") or {}).items()},
        gallery=dict(body.get("gallery") or {"samples": 6, "split": "test"}),
        description=first.lstrip("# ").strip() if first.startswith("#") else "",
        baselines=baselines,
        parts=parts,
    )


def _read_budget(path: Path, where: str, budget: dict[str, Any]) -> dict[str, Any]:
    bad = sorted(set(budget) - set(_BUDGET_KINDS))
    if bad:
        raise _fail(path, f"{where}.{bad[0]}", f"unknown budget kind; use one of {sorted(_BUDGET_KINDS)}")
    for kind, value in budget.items():
        whole = kind != "minutes"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value <= 0:
            what = "a positive integer" if whole else "a positive number"
            raise _fail(path, f"{where}.{kind}", f"must be {what}, got {value!r}")
    return dict(budget)


def _read_backbone_from(path: Path, where: str, source: Any, parts: list[StudyPart]) -> str:
    """``backbone_from``: an earlier, trained part whose cells have one cell per seed, and seeds
    that cover this part's."""
    at = f"{where}.{BACKBONE_FROM_KEY}"
    earlier = {p.name: p for p in parts[:-1]}
    if not isinstance(source, str) or source not in earlier:
        raise _fail(path, at, f"names the part whose trained backbones this part starts from, one listed "
                    f"before it (the earlier parts are {sorted(earlier)}), got {source!r}")
    mine, theirs = parts[-1], earlier[source]
    if mine.zero_shot or theirs.zero_shot:
        raise _fail(path, at, "a zero-shot part neither trains a backbone nor starts from one")
    if "seed" not in theirs.grid or "seed" not in mine.grid:
        raise _fail(path, at, f"cells are matched by seed: both this part and part {source!r} need grid.seed")
    cells_per_seed = 1
    for key, values in theirs.grid.items():
        if key != "seed":
            cells_per_seed *= len(values)
    if cells_per_seed != 1:
        raise _fail(path, at, f"part {source!r} has {cells_per_seed} cells per seed; the backbone to start from "
                    "must be one cell per seed (give its other grid keys one value each)")
    missing = sorted(set(map(str, mine.grid["seed"])) - set(map(str, theirs.grid["seed"])), key=str)
    if missing:
        raise _fail(path, at, f"part {source!r} has no cell with seed {missing[0]}")
    return source


def _read_fixed(path: Path, where: str, fixed: Any) -> list[str]:
    if isinstance(fixed, dict):
        return [f"{k}={_override_value(v)}" for k, v in fixed.items()]
    if isinstance(fixed, list) and all(isinstance(x, str) and "=" in x for x in fixed):
        return list(fixed)
    raise _fail(path, where, "must be a mapping of recipe keys to values or a list of key=value strings")


def _read_part(
    path: Path, where: str, name: str, body: dict[str, Any], budget: dict[str, Any], fixed: list[str]
) -> StudyPart:
    """``recipe``, ``grid`` and ``compare`` of a study (``where`` = ``study``) or of one part."""
    recipe = body["recipe"]
    if not isinstance(recipe, str) or not recipe.strip():
        raise _fail(path, f"{where}.recipe", f"must be text, got {recipe!r}")
    zero_shot = body.get(ZERO_SHOT_KEY, False)
    if not isinstance(zero_shot, bool):
        raise _fail(path, f"{where}.{ZERO_SHOT_KEY}", f"must be true or false, got {zero_shot!r}")
    if zero_shot:
        if body.get("budget"):
            raise _fail(path, f"{where}.budget", "zero-shot cells train nothing, so they have no budget; remove "
                        f"the budget or {where}.{ZERO_SHOT_KEY}")
        if BUDGET_KEY in (body.get("grid") or {}):
            raise _fail(path, f"{where}.grid.{BUDGET_KEY}", "zero-shot cells train nothing, so there is no "
                        f"budget to multiply; remove the axis or {where}.{ZERO_SHOT_KEY}")
    grid = body["grid"]
    if not isinstance(grid, dict) or not grid:
        raise _fail(path, f"{where}.grid", "must map each grid key to a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"{where}.grid.{key}", "must be a non-empty list")
    if PART_KEY in grid:
        raise _fail(path, f"{where}.grid.{PART_KEY}", "is the part's name: list the parts under study.parts instead")
    for placeholder in _PLACEHOLDER.findall(recipe):
        if placeholder not in grid:
            raise _fail(path, f"{where}.recipe", f"placeholder {{{placeholder}}} is not a grid key")
    if RUNG_KEY in grid:
        from vlzoo.data.shapes import RUNGS

        bad_rungs = [v for v in grid[RUNG_KEY] if v not in RUNGS]
        if bad_rungs:
            raise _fail(path, f"{where}.grid.{RUNG_KEY}", f"unknown rung(s) {bad_rungs}; the Shapes ladder is {list(RUNGS)}")
    if BUDGET_KEY in grid:
        bad_mult = [v for v in grid[BUDGET_KEY] if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
        if bad_mult:
            raise _fail(path, f"{where}.grid.{BUDGET_KEY}", f"must be positive multipliers of study.budget, got {bad_mult}")
        if not budget:
            raise _fail(path, f"{where}.grid.{BUDGET_KEY}", "multiplies study.budget, which is not set (e.g. budget: {steps: 300})")
    compare_raw = body.get("compare") or []
    if not isinstance(compare_raw, list):
        raise _fail(path, f"{where}.compare", "must be a list of {axis, a, b} mappings")
    compare = []
    for i, item in enumerate(compare_raw):
        at = f"{where}.compare[{i}]"
        if not isinstance(item, dict) or not {"axis", "a", "b"} <= set(item) or set(item) - {"axis", "a", "b", "differ"}:
            raise _fail(path, at, f"must be a mapping with axis, a, b and optionally differ, got {item!r}")
        differ = item.get("differ", [])
        if not isinstance(differ, list) or not all(isinstance(k, str) and k for k in differ):
            raise _fail(path, f"{at}.differ", f"must be a list of recipe keys (e.g. [data.train, data.val]), got {differ!r}")
        axis = item["axis"]
        if axis not in grid or axis == "seed":
            raise _fail(path, f"{at}.axis", f"{axis!r} is not a grid key to compare along (the grid has {sorted(grid)})")
        for side in ("a", "b"):
            if item[side] not in grid[axis]:
                raise _fail(path, f"{at}.{side}", f"{item[side]!r} is not a value of grid.{axis} {grid[axis]}")
        if item["a"] == item["b"]:
            raise _fail(path, at, "a and b are the same value: nothing to compare")
        compare.append(Comparison(axis=str(axis), a=item["a"], b=item["b"], part=name, differ=tuple(differ)))
    return StudyPart(name=name, recipe=recipe, grid={k: list(v) for k, v in grid.items()}, fixed=fixed,
                     budget={} if zero_shot else dict(budget), compare=compare, zero_shot=zero_shot)


def _override_value(value: Any) -> str:
    if value is None:  # a grid value `null` is YAML's null, not the text "None"
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def task_mix(task: str) -> list[str]:
    """The tasks of a ``task`` grid value: ``rec+res`` (one model trained on a task mix) ->
    ``["rec", "res"]``; a single task -> ``[task]``."""
    return [t for t in str(task).split(MIX_SEPARATOR) if t]


def _fill(item: str, values: dict[str, Any]) -> str:
    """Replace ``{key}`` of grid keys in an override (other braces, e.g. YAML flow maps, stay);
    a task mix fills in as a YAML list body (``[{task}]`` -> ``[rec, res]``)."""

    def value(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            return m.group(0)
        return ", ".join(task_mix(values[key])) if key == TASK_KEY else str(values[key])

    return _PLACEHOLDER.sub(value, item)


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
    """The cells of a study in a stable order: the parts in file order, each part's grid in its
    key order with values in listed order; indices run over the whole study.

    ``supports(recipe_path, task) -> (bool, reason)`` decides whether a cell's recipe can do
    its task (e.g. :func:`vlzoo.study.runner.paradigm_supports`); by default only a missing
    recipe file makes a cell unsupported.
    """
    cells: list[Cell] = []
    for part in spec.parts:
        keys = list(part.grid)
        selecting = set(_PLACEHOLDER.findall(part.recipe))
        for combo in itertools.product(*(part.grid[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            if part.name:
                values = {PART_KEY: part.name, **values}
            recipe = (spec.path.parent / part.recipe.format(**values)).resolve()
            # ``task`` is no recipe key: outside the recipe pattern it only names the cell's task
            # (a recipe for one task, e.g. recipes/gpu/pixel2seq_qwen2vl_refcoco.yaml)
            overrides = [f"{k}={_override_value(v)}" for k, v in values.items()
                         if k not in selecting and k not in AXES and k != TASK_KEY]
            overrides += [_fill(item, values) for item in [*spec.fixed, *part.fixed]]
            if RUNG_KEY in values and recipe.is_file():
                overrides += rung_overrides(recipe, overrides, str(values[RUNG_KEY]))
            overrides += part.budget_overrides(values.get(BUDGET_KEY, 1))
            supported, reason = True, ""
            if "task" in values and supports is not None:
                for task in task_mix(values["task"]):
                    supported, reason = supports(recipe, task)
                    if not supported:
                        break
            if supported and not recipe.is_file():
                supported, reason = False, f"no recipe {recipe.name} for this cell"
            cells.append(
                Cell(
                    index=len(cells),
                    values=values,
                    recipe=recipe,
                    overrides=tuple(overrides),
                    supported=supported,
                    reason=reason,
                    zero_shot=part.zero_shot,
                    backbone_from=part.backbone_from,
                )
            )
    return cells
