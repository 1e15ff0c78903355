"""Scoring a file of any model's answers against a dataset split (``vlzoo score``).

An answers file is JSON Lines, one object per answer: ``{"sent_id": ..., "text": ...}`` (RefCOCO
sentences) or ``{"image_id": ..., "text": ...}`` (one referring sample per image, as Shapes).
The file ``vlzoo predict`` writes (a JSON list of records with ``sent_id`` / ``image_id`` and
``text``) is read as well; its several records of one sample (one per predicted box) share one
answer text.

Each answer is read by :func:`~vlzoo.scoring.answers_parser.parse_answer`, its boxes are mapped to
original pixels through the declared coordinate frame (:mod:`vlzoo.data.frames`) and scored by
:class:`~vlzoo.evaluation.ReferringBoxAccuracy` (REC Acc@0.5 / 0.75 / 0.9 and mean IoU; the first
box of an answer is its answer).  Unparsed answers and samples without an answer are misses.

The diagnostic scores the same answers under every frame of :data:`~vlzoo.data.frames.FRAMES`
and **warns** when another frame fits far better (:data:`FAR_BETTER_GAIN` absolute and
:data:`FAR_BETTER_RATIO` times the declared frame's Acc@0.5): the likely mistake is the declared
frame.  The declared frame's figures are always the ones reported; the best frame is never
silently kept.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlzoo.data.errors import DataError
from vlzoo.data.frames import FAMILY_FRAMES, FRAMES, Frame, make_frame
from vlzoo.evaluation.referring import ReferringBoxAccuracy
from vlzoo.paradigms.codecs import CODECS
from vlzoo.scoring.answers_parser import ParsedAnswer, codec_for_scoring, parse_answer
from vlzoo.structures import Predictions, Targets

__all__ = [
    "AnswersError",
    "Answer",
    "Reference",
    "ScoreReport",
    "read_answers",
    "reference_samples",
    "score_answers",
    "load_split",
    "FAR_BETTER_GAIN",
    "FAR_BETTER_RATIO",
    "KEYS",
]

#: another frame "fits far better" when its Acc@0.5 is at least this much higher (absolute) ...
FAR_BETTER_GAIN = 0.2
#: ... and at least this many times the declared frame's
FAR_BETTER_RATIO = 2.0
#: the fields an answer may be keyed by, most specific first
KEYS = ("sent_id", "image_id")
_EXAMPLES = 5


class AnswersError(DataError):
    """An answers file, or its match with the split, is wrong (names the file and line)."""


@dataclass
class Answer:
    """One answer of the file: where it is (``line``: the JSONL line, or the record number of a
    JSON list), what it answers (``key``: ``("sent_id", 17)``) and its text."""

    line: int
    key: tuple[str, Any]
    text: Any
    where: str = "line"

    @property
    def place(self) -> str:
        """``"line 3"`` (JSONL) or ``"record 3"`` (a JSON list)."""
        return f"{self.where} {self.line}"


@dataclass
class Reference:
    """One referring (``rec``) sample of the split: its ids and targets (original pixels)."""

    ids: dict[str, Any]
    target: Targets


def _key_value(value: Any) -> Any:
    """An id as written (``17`` and ``"17"`` are the same id)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return value


def read_answers(path: str | Path) -> list[Answer]:
    """The answers of a JSONL file (or of ``vlzoo predict``'s JSON list), one per sample.

    Raises :class:`AnswersError` naming the file and line for a missing file, a line that is not
    a JSON object, a record without ``sent_id`` / ``image_id`` or ``text``, and two different
    answers to one sample."""
    path = Path(path)
    if not path.is_file():
        raise AnswersError(f"{path}: answers file not found; give a JSONL file of {{\"sent_id\" or \"image_id\", \"text\"}}")
    raw = path.read_text(encoding="utf-8-sig", errors="replace")  # a byte-order mark is not an error
    records: list[tuple[int, Any]] = []
    where = "line"
    if raw.lstrip().startswith("["):  # vlzoo predict's record list
        where = "record"
        try:
            listed = json.loads(raw)
        except ValueError as err:
            raise AnswersError(f"{path}: starts with '[' but is not a JSON list ({err}); write one JSON object per line") from None
        records = list(enumerate(listed, start=1))
    else:
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except ValueError as err:
                raise AnswersError(f"{path} line {number}: not valid JSON ({err}); each line is one JSON object "
                                   f"such as {{\"sent_id\": 17, \"text\": \"...\"}}") from None
    answers: dict[tuple[str, Any], Answer] = {}
    for number, record in records:
        if not isinstance(record, dict):
            raise AnswersError(f"{path} {where} {number}: a JSON object is expected, got {type(record).__name__}")
        if record.get("task") not in (None, "rec"):
            continue  # vlzoo predict's records of other tasks (a mixed split): REC answers only
        key = next(((k, _key_value(record[k])) for k in KEYS if record.get(k) is not None), None)
        if key is None:
            raise AnswersError(f"{path} {where} {number}: no 'sent_id' or 'image_id': say which sample it answers")
        if "text" not in record:
            raise AnswersError(f"{path} {where} {number}: no 'text' (the model's answer) for {key[0]} {key[1]}")
        seen = answers.get(key)
        if seen is not None:
            if seen.text != record["text"]:
                raise AnswersError(f"{path} {where} {number}: a second, different answer to {key[0]} {key[1]} "
                                   f"(the first is at {seen.place}); keep one answer per sample")
            continue
        answers[key] = Answer(line=number, key=key, text=record["text"], where=where)
    if not answers:
        raise AnswersError(f"{path}: no answers in the file")
    kinds = {a.key[0] for a in answers.values()}
    if len(kinds) > 1:
        first = {k: next(a for a in answers.values() if a.key[0] == k) for k in kinds}
        raise AnswersError(f"{path}: answers are keyed by both sent_id ({first['sent_id'].place}) and image_id "
                           f"({first['image_id'].place}); key every answer the same way")
    return list(answers.values())


def reference_samples(dataset: Sequence[Any]) -> list[Reference]:
    """The ``rec`` samples of a dataset with their ids (``image_id``, and ``sent_id`` / ``ref_id``
    where the dataset has them, as RefCOCO's); reads every item once."""
    out = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is None or sample.task != "rec":
            continue
        meta = sample.meta or {}
        ids = {"image_id": int(sample.targets.image_id)}
        for name in ("sent_id", "ref_id"):
            if meta.get(name) is not None:
                ids[name] = _key_value(meta[name])
        out.append(Reference(ids=ids, target=sample.targets))
    return out


# --------------------------------------------------------------------------------------------- recipes
def _data_recipe(name: str, overrides: Sequence[str], allow_targets: Sequence[str]):
    """The recipe holding the ``data`` slot: a whole recipe, or a data recipe file
    (``recipes/data/*.yaml``, also by its bare name) wrapped as ``data:``."""
    import yaml

    from vlzoo.config import RecipeError, find_recipe, load_recipe, recipe_from_dict

    try:
        path = find_recipe(name)
    except RecipeError:
        try:
            path = find_recipe(f"data/{name}")
        except RecipeError:
            raise RecipeError(f"--recipe {name}: neither a recipe nor a data recipe (recipes/data/{name}.yaml); "
                              "`vlzoo recipes` lists them") from None
    try:
        head = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        head = None
    if isinstance(head, dict) and "_target_" in head:
        return recipe_from_dict({"data": {"_base_": [str(Path(path).resolve())]}}, overrides=overrides,
                                allow_targets=allow_targets, source=str(path), path=Path(path).resolve())
    return load_recipe(path, overrides, allow_targets=allow_targets)


def load_split(recipe_name: str, split: str, *, overrides: Sequence[str] = (), allow_targets: Sequence[str] = ()):
    """``(dataset, "data.<key>")``: the split's dataset as the recipe builds it (with the
    recipe's seed).  ``split`` is ``val`` / ``test`` or the name of one of their sets (RefCOCO's
    ``testA``)."""
    from vlzoo.config import RecipeError, instantiate

    recipe = _data_recipe(recipe_name, overrides, allow_targets)
    data = recipe.slot("data")
    if not isinstance(data, Mapping):
        raise RecipeError(f"--recipe {recipe_name}: the recipe has no 'data' slot to score against")
    key, node = f"data.{split}", data.get(split)
    if node is None:
        for stage in ("val", "test"):
            sets = data.get(stage)
            if isinstance(sets, Mapping) and "_target_" not in sets and split in sets:
                key, node = f"data.{stage}.{split}", sets[split]
    if not isinstance(node, Mapping):
        named = [f"{s}.{n}" for s in ("val", "test") if isinstance(data.get(s), Mapping) and "_target_" not in data[s]
                 for n in data[s]]
        raise RecipeError(f"--split {split}: recipe {recipe.path or recipe_name} has no data.{split} dataset"
                          + (f" (its named sets: {', '.join(named)})" if named else "; use val or test"))
    if "_target_" not in node:
        if len(node) != 1:
            raise RecipeError(f"--split {split}: {key} holds several sets ({', '.join(map(str, node))}); "
                              "pass --split with one of their names")
        name = next(iter(node))
        key, node = f"{key}.{name}", node[name]
    inject = {"seed": recipe.seed} if recipe.seed is not None else {}
    return instantiate(node, inject=inject, allow=recipe.allowed_prefixes, key=key), key


# --------------------------------------------------------------------------------------------- scoring
def _match(answers: list[Answer], refs: list[Reference], answers_file: str) -> list[Answer | None]:
    """The answer of each reference sample (``None``: unanswered); :class:`AnswersError` for an
    answer to no sample of the split, or a key that does not single out a sample."""
    if not answers:
        return [None] * len(refs)
    kind = answers[0].key[0]
    if kind == "sent_id" and refs and not any("sent_id" in r.ids for r in refs):
        raise AnswersError(f"{answers_file}: answers are keyed by sent_id, but this split's samples have none "
                           "(e.g. Shapes); key them by image_id")
    index: dict[Any, int] = {}
    for i, ref in enumerate(refs):
        value = ref.ids.get(kind)
        if value in index:
            raise AnswersError(f"{answers_file}: several referring samples of the split share {kind} {value}, so an "
                               "answer keyed by it is ambiguous; key the answers by sent_id")
        index[value] = i
    matched: list[Answer | None] = [None] * len(refs)
    for answer in answers:
        i = index.get(answer.key[1])
        if i is None:
            raise AnswersError(f"{answers_file} {answer.place}: {kind} {answer.key[1]!r} is not a referring "
                               "sample of the split scored; check --recipe / --split (and the recipe's seed)")
        matched[i] = answer
    return matched


def _prediction(parsed: ParsedAnswer, frame: Frame, target: Targets) -> Predictions:
    size = target.image_size
    if not parsed.parsed:
        return Predictions(parsed=False, image_id=target.image_id, image_size=size)
    boxes = torch.tensor(parsed.boxes, dtype=torch.float64).reshape(-1, 4)
    # a box written corner-swapped (x2 < x1) is read as the box the two corners span
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    mapped = frame.fractions_to_original(boxes, size) if parsed.fractions else frame.to_original(boxes, size)
    return Predictions(boxes=mapped, image_id=target.image_id, image_size=size)


def _figures(parsed: list[ParsedAnswer], refs: list[Reference], frame: Frame, *, thresholds: Sequence[float],
             kinds: bool) -> dict[str, float]:
    metric = ReferringBoxAccuracy(thresholds=thresholds) if kinds else ReferringBoxAccuracy(thresholds=thresholds, kinds=())
    preds = [_prediction(p, frame, r.target) for p, r in zip(parsed, refs, strict=True)]
    metric.update(preds, [r.target for r in refs])
    return {k: round(float(v), 6) for k, v in metric.compute().items()}


@dataclass
class ScoreReport:
    """What ``vlzoo score`` found: the declared frame's figures, the counts, the figures under
    every frame and the warnings.  :meth:`format` is the printed report, :meth:`to_dict` the JSON."""

    answers_file: str
    split: str
    codec: str
    frame: str
    samples: int
    answered: int
    missing: int
    parse_failures: int
    truncated: int
    several_boxes: int
    forms: dict[str, int]
    metrics: dict[str, float]
    by_frame: dict[str, dict[str, float]]
    warnings: list[str] = field(default_factory=list)
    failure_examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def primary(self) -> str:
        return "acc_0.5" if "acc_0.5" in self.metrics else next(k for k in self.metrics if k.startswith("acc_"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "answers_file": self.answers_file, "split": self.split, "codec": self.codec, "frame": self.frame,
            "samples": self.samples, "answered": self.answered, "missing": self.missing,
            "parse_failures": self.parse_failures, "truncated": self.truncated, "several_boxes": self.several_boxes,
            "forms": dict(self.forms), "metrics": dict(self.metrics), "by_frame": {k: dict(v) for k, v in self.by_frame.items()},
            "warnings": list(self.warnings), "failure_examples": list(self.failure_examples),
        }

    def format(self) -> str:
        key = self.primary
        lines = [
            f"vlzoo score: {self.answers_file} against {self.split} (codec {self.codec}, frame {self.frame})",
            f"  samples {self.samples}, answered {self.answered}, unanswered {self.missing} (misses), "
            f"parse failures {self.parse_failures} (misses)",
            f"  answer forms: {', '.join(f'{k} {v}' for k, v in sorted(self.forms.items())) or 'none'}; "
            f"several boxes {self.several_boxes} (the first is scored); truncated {self.truncated} (complete boxes kept)",
            "  " + "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items() if "/" not in k),
        ]
        kinds = sorted({k.split("/")[1] for k in self.metrics if k.startswith("by_kind/")})
        for kind in kinds:
            lines.append(f"    {kind:<12} {key} {self.metrics[f'by_kind/{kind}/{key}']:.4f}  "
                         f"(n={int(self.metrics[f'by_kind/{kind}/count'])})")
        lines.append(f"  diagnostic, {key} under every frame (the declared one is marked *):")
        for name, figures in self.by_frame.items():
            mark = "*" if name == self.frame else " "
            lines.append(f"   {mark} {name:<30} {figures[key]:.4f}")
        for example in self.failure_examples:
            lines.append(f"  unparsed ({example['where']}): {example['reason']}: {example['text']!r}")
        for warning in self.warnings:
            lines.append(f"WARNING: {warning}")
        return "\n".join(lines) + "\n"


def score_answers(
    answers: list[Answer],
    refs: list[Reference],
    *,
    codec: str,
    frame: str | None = None,
    answers_file: str = "<answers>",
    split: str = "<split>",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int | None = None,
    square_size: int | None = None,
    bins: int | None = None,
    thresholds: Sequence[float] = (0.5, 0.75, 0.9),
) -> ScoreReport:
    """Score ``answers`` against ``refs`` read by ``codec`` in ``frame`` (default: the family's,
    :data:`~vlzoo.data.frames.FAMILY_FRAMES`), with the every-frame diagnostic.
    ``min_pixels`` / ``max_pixels`` / ``factor`` set ``smart_resize``, ``square_size`` the side of
    ``pad_to_square``, ``bins`` the bin count of the ``bins`` codec (default 64)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    if not refs:
        raise AnswersError(f"{split}: the split has no referring (rec) samples to score")
    frame = frame or FAMILY_FRAMES[codec]
    options = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels), ("factor", factor),
                                 ("square_size", square_size)) if v is not None}
    frames = {name: make_frame(name, **options) for name in dict.fromkeys([*FRAMES, frame])}
    reader = codec_for_scoring(codec, bins=bins)
    matched = _match(answers, refs, answers_file)
    parsed = [parse_answer(a.text, reader) if a is not None else ParsedAnswer(failure="no answer")
              for a in matched]
    answered = [(a, p) for a, p in zip(matched, parsed, strict=True) if a is not None]
    failures = [(a, p) for a, p in answered if not p.parsed]
    kinds = any(r.target.expression_kinds for r in refs)
    by_frame = {}
    for name, f in frames.items():
        figures = _figures(parsed, refs, f, thresholds=thresholds, kinds=kinds and name == frame)
        by_frame[name] = figures
    metrics = by_frame[frame]
    by_frame = {name: {k: v for k, v in figures.items() if "/" not in k} for name, figures in by_frame.items()}
    report = ScoreReport(
        answers_file=answers_file, split=split, codec=codec, frame=frame, samples=len(refs), answered=len(answered),
        missing=len(refs) - len(answered), parse_failures=len(failures),
        truncated=sum(p.truncated for _, p in answered if p.parsed),
        several_boxes=sum(len(p.boxes) > 1 for _, p in answered),
        forms=dict(Counter(p.form for _, p in answered if p.parsed)), metrics=metrics, by_frame=by_frame,
        failure_examples=[{"where": a.place, "reason": p.failure, "text": str(a.text)[:120]}
                          for a, p in failures[:_EXAMPLES]],
    )
    report.warnings.extend(_frame_warnings(report))
    if report.missing:
        report.warnings.append(f"{report.missing} of {report.samples} samples have no answer in {answers_file}; "
                               "they are scored as misses")
    if failures and len(failures) * 2 >= len(answered):
        report.warnings.append(f"{len(failures)} of {len(answered)} answers could not be parsed (scored as misses); "
                               f"is --codec {codec} the model's syntax? examples above")
    return report


def _frame_warnings(report: ScoreReport) -> list[str]:
    key = report.primary
    declared = report.by_frame[report.frame][key]
    better = [(figures[key], name) for name, figures in report.by_frame.items()
              if name != report.frame and figures[key] >= declared + FAR_BETTER_GAIN
              and figures[key] >= FAR_BETTER_RATIO * declared]
    if not better:
        return []
    value, name = max(better)
    return [f"the answers fit frame '{name}' far better than the declared '{report.frame}' ({key} {value:.4f} vs "
            f"{declared:.4f}): the model probably writes in '{name}'. The declared frame's figures are reported; "
            f"check the model's convention (docs/evaluation.md, 'Coordinate frames') and pass --frame {name} if "
            "that is what it writes"]
