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

``task="res"`` and ``task="det"`` score polygons / masks with
:class:`~vlzoo.evaluation.ReferringSegmentation` and labelled boxes with
:class:`~vlzoo.evaluation.DetectionMAP` the same way (:mod:`vlzoo.scoring.tasks`).
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
from vlzoo.scoring.objects_parser import ParsedObjects, ParsedPolygons, parse_objects, parse_polygons
from vlzoo.scoring.tasks import (
    PRIMARY,
    SCORED_TASKS,
    box_prediction,
    category_names,
    decode_segmentation,
    detection_figures,
    detection_prediction,
    detection_units,
    mask_figures,
    mask_prediction,
    resolve_objects,
    unknown_summary,
)
from vlzoo.structures import Targets

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
_TASK_NAMES = {"rec": "referring", "res": "referring segmentation", "det": "detection"}


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
    #: ``(place, segmentation field)`` of each record of the sample with one (COCO RLE or
    #: polygons, original pixels; ``--task res``): ``vlzoo predict`` writes one record per instance
    segmentation: list[tuple[str, Any]] = field(default_factory=list)
    #: ``--task det``: the texts of an image's records by the category they name (``None``: no
    #: ``category_id``): ``vlzoo predict`` on a split with one sample per image and category, as
    #: COCO, writes one text per category; the first is :attr:`text`
    parts: dict[int | None, Any] = field(default_factory=dict)

    @property
    def place(self) -> str:
        """``"line 3"`` (JSONL) or ``"record 3"`` (a JSON list)."""
        return f"{self.where} {self.line}"


@dataclass
class Reference:
    """One referring (``rec``) sample of the split: its ids and targets (original pixels)."""

    ids: dict[str, Any]
    target: Targets
    #: the category a ``det`` sample's query names (id and name; ``None`` for referring samples)
    category_id: int | None = None
    category_name: str | None = None


def _key_value(value: Any) -> Any:
    """An id as written (``17`` and ``"17"`` are the same id)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return value


def read_answers(path: str | Path, task: str = "rec") -> list[Answer]:
    """The answers of a JSONL file (or of ``vlzoo predict``'s JSON list), one per sample;
    records of another ``task`` than the one scored are skipped.  For ``res`` a record may hold a
    ``segmentation`` field (COCO RLE or polygons) instead of, or as well as, ``text``.

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
        if record.get("task") not in (None, task):
            continue  # vlzoo predict's records of other tasks (a mixed split): the scored task's only
        key = next(((k, _key_value(record[k])) for k in KEYS if record.get(k) is not None), None)
        if key is None:
            raise AnswersError(f"{path} {where} {number}: no 'sent_id' or 'image_id': say which sample it answers")
        segmentation = record.get("segmentation") if task == "res" else None
        if "text" not in record and segmentation is None:
            extra = " or 'segmentation' (a COCO RLE)" if task == "res" else ""
            raise AnswersError(f"{path} {where} {number}: no 'text' (the model's answer){extra} for {key[0]} {key[1]}")
        text = record.get("text")
        seen = answers.get(key)
        parts = task == "det" and key[0] == "image_id"
        category = record.get("category_id") if parts and isinstance(record.get("category_id"), int) else None
        if seen is not None and parts and category not in seen.parts:
            seen.parts[category] = text  # another category's sample of the same image (vlzoo predict)
            continue
        if seen is not None:
            if (seen.parts[category] if parts else seen.text) != text:
                raise AnswersError(f"{path} {where} {number}: a second, different answer to {key[0]} {key[1]} "
                                   f"(the first is at {seen.place}); keep one answer per sample")
            if segmentation is not None:  # another instance of the same answer (vlzoo predict)
                seen.segmentation.append((f"{where} {number}", segmentation))
            continue
        answers[key] = Answer(line=number, key=key, text=text, where=where,
                              segmentation=[] if segmentation is None else [(f"{where} {number}", segmentation)],
                              parts={category: text} if parts else {})
    if not answers:
        raise AnswersError(f"{path}: no answers in the file")
    kinds = {a.key[0] for a in answers.values()}
    if len(kinds) > 1:
        first = {k: next(a for a in answers.values() if a.key[0] == k) for k in kinds}
        raise AnswersError(f"{path}: answers are keyed by both sent_id ({first['sent_id'].place}) and image_id "
                           f"({first['image_id'].place}); key every answer the same way")
    return list(answers.values())


def reference_samples(dataset: Sequence[Any], task: str = "rec") -> list[Reference]:
    """The ``task`` samples (``rec``, ``res`` or ``det``) of a dataset with their ids
    (``image_id``, and ``sent_id`` / ``ref_id`` where the dataset has them, as RefCOCO's) and the
    category a ``det`` query names; reads every item once."""
    out = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is None or sample.task != task:
            continue
        meta = sample.meta or {}
        ids = {"image_id": int(sample.targets.image_id)}
        for name in ("sent_id", "ref_id"):
            if meta.get(name) is not None:
                ids[name] = _key_value(meta[name])
        out.append(Reference(ids=ids, target=sample.targets, category_id=sample.category_id,
                             category_name=sample.category_name))
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


def _figures(parsed: list[ParsedAnswer], refs: list[Reference], frame: Frame, *, thresholds: Sequence[float],
             kinds: bool) -> dict[str, float]:
    metric = ReferringBoxAccuracy(thresholds=thresholds) if kinds else ReferringBoxAccuracy(thresholds=thresholds, kinds=())
    preds = [box_prediction(p, frame, r.target) for p, r in zip(parsed, refs, strict=True)]
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
    #: ``rec``, ``res`` or ``det``
    task: str = "rec"
    #: counts of the task's own (res: ``dropped_polygons``, ``segmentation_fields``; det:
    #: ``boxes``, ``scored_boxes``, ``unknown_labels``, ``unlabelled``, ``unknown_label_names``,
    #: ``unparsed_parts``, ``skipped_groups``, ``categories``)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        if self.task in PRIMARY:
            return PRIMARY[self.task]
        return "acc_0.5" if "acc_0.5" in self.metrics else next(k for k in self.metrics if k.startswith("acc_"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "answers_file": self.answers_file, "split": self.split, "codec": self.codec, "frame": self.frame,
            "samples": self.samples, "answered": self.answered, "missing": self.missing,
            "parse_failures": self.parse_failures, "truncated": self.truncated, "several_boxes": self.several_boxes,
            "forms": dict(self.forms), "metrics": dict(self.metrics), "by_frame": {k: dict(v) for k, v in self.by_frame.items()},
            "warnings": list(self.warnings), "failure_examples": list(self.failure_examples),
            "task": self.task, "details": dict(self.details),
        }

    def format(self) -> str:
        key = self.primary
        lines = [
            f"vlzoo score: {self.answers_file} against {self.split} (task {self.task}, codec {self.codec}, "
            f"frame {self.frame})",
            f"  {'images' if self.task == 'det' else 'samples'} {self.samples}, answered {self.answered}, "
            f"unanswered {self.missing} (misses), parse failures {self.parse_failures} (misses)",
            f"  answer forms: {', '.join(f'{k} {v}' for k, v in sorted(self.forms.items())) or 'none'}; "
            + self._counts_line(),
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

    def _counts_line(self) -> str:
        d = self.details
        if self.task == "res":
            return (f"several polygons {self.several_boxes} (their union is the mask); truncated {self.truncated} "
                    f"(complete polygons kept); polygons under 3 vertices {d.get('dropped_polygons', 0)} (not drawn); "
                    f"masks from 'segmentation' fields {d.get('segmentation_fields', 0)}")
        if self.task == "det":
            names = ", ".join(f"{k!r} {v}" for k, v in list(d.get("unknown_label_names", {}).items())[:5])
            return (f"truncated {self.truncated} (complete boxes kept); boxes {d.get('boxes', 0)}, scored "
                    f"{d.get('scored_boxes', 0)}, labels of no category {d.get('unknown_labels', 0)}"
                    + (f" ({names})" if names else "") + f", unlabelled in a unit of several categories "
                    f"{d.get('unlabelled', 0)} (neither scored)"
                    + (f"; unparsed parts of answers {d['unparsed_parts']} (their boxes are misses)"
                       if d.get("unparsed_parts") else "")
                    + (f"; coordinate groups that are no box {d['skipped_groups']} (not read)"
                       if d.get("skipped_groups") else ""))
        return f"several boxes {self.several_boxes} (the first is scored); truncated {self.truncated} (complete boxes kept)"


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
    task: str = "rec",
) -> ScoreReport:
    """Score ``answers`` against ``refs`` read by ``codec`` in ``frame`` (default: the family's,
    :data:`~vlzoo.data.frames.FAMILY_FRAMES`), with the every-frame diagnostic.
    ``min_pixels`` / ``max_pixels`` / ``factor`` set ``smart_resize``, ``square_size`` the side of
    ``pad_to_square``, ``bins`` the bin count of the ``bins`` codec (default 64).  ``task``:
    ``rec`` (``refs`` from :func:`reference_samples`), ``res`` or ``det`` (``refs`` of that task;
    :mod:`vlzoo.scoring.tasks`); ``thresholds`` are REC's."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    if task not in SCORED_TASKS:
        raise ValueError(f"unknown task {task!r}; vlzoo score scores {', '.join(SCORED_TASKS)}")
    if not refs:
        others = ", ".join(f"--task {t}" for t in SCORED_TASKS if t != task)
        raise AnswersError(f"{split}: the split has no {_TASK_NAMES[task]} ({task}) samples to score; "
                           f"is the split of another task ({others})?")
    frame = frame or FAMILY_FRAMES[codec]
    options = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels), ("factor", factor),
                                 ("square_size", square_size)) if v is not None}
    frames = {name: make_frame(name, **options) for name in dict.fromkeys([*FRAMES, frame])}
    reader = codec_for_scoring(codec, bins=bins)
    if task != "rec":
        score = _score_masks if task == "res" else _score_detections
        report = score(answers, refs, frames, frame, reader, codec=codec, answers_file=answers_file, split=split)
        _common_warnings(report, codec)
        return report
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
    _common_warnings(report, codec)
    return report


def _common_warnings(report: ScoreReport, codec: str) -> None:
    report.warnings.extend(_frame_warnings(report))
    unit = "images" if report.task == "det" else "samples"
    if report.missing:
        report.warnings.append(f"{report.missing} of {report.samples} {unit} have no answer in {report.answers_file}; "
                               "they are scored as misses")
    if report.parse_failures and report.parse_failures * 2 >= report.answered:
        report.warnings.append(f"{report.parse_failures} of {report.answered} answers could not be parsed (scored as "
                               f"misses); is --codec {codec} the model's syntax? examples above")
    unknown = report.details.get("unknown_labels", 0) + report.details.get("unlabelled", 0)
    if unknown:
        names = ", ".join(repr(k) for k in list(report.details.get("unknown_label_names", {}))[:5])
        report.warnings.append(
            f"{unknown} of {report.details.get('boxes', 0)} boxes are not scored: "
            f"{report.details.get('unknown_labels', 0)} are labelled with no category of the split"
            + (f" ({names})" if names else "") + f", {report.details.get('unlabelled', 0)} are unlabelled in an "
            "image of several categories; the split's categories are "
            + ", ".join(repr(n) for n in report.details.get("categories", [])))


def _failure_examples(failures: list[tuple[Answer, Any]]) -> list[dict[str, Any]]:
    return [{"where": a.place, "reason": p.failure, "text": str(a.text)[:120]} for a, p in failures[:_EXAMPLES]]


def _score_masks(answers: list[Answer], refs: list[Reference], frames: dict[str, Frame], frame: str, reader, *,
                 codec: str, answers_file: str, split: str) -> ScoreReport:
    """``--task res``: polygons (or a record's ``segmentation``) -> masks, ReferringSegmentation."""
    matched = _match(answers, refs, answers_file)
    parsed: list[ParsedPolygons] = []
    fields: list[torch.Tensor | None] = []
    for answer, ref in zip(matched, refs, strict=True):
        size = tuple(int(v) for v in ref.target.image_size)
        if answer is not None and answer.segmentation:
            mask = torch.zeros(size, dtype=torch.bool)
            for place, seg in answer.segmentation:
                try:
                    mask |= decode_segmentation(seg, size, f"{answers_file} {place}")
                except ValueError as err:
                    raise AnswersError(str(err)) from None
            fields.append(mask)
            parsed.append(ParsedPolygons(form="segmentation"))
            continue
        fields.append(None)
        parsed.append(parse_polygons(answer.text, reader) if answer is not None
                      else ParsedPolygons(failure="no answer"))
    answered = [(a, p, m) for a, p, m in zip(matched, parsed, fields, strict=True) if a is not None]
    failures = [(a, p) for a, p, m in answered if m is None and not p.parsed]
    kinds = any(r.target.expression_kinds for r in refs)
    targets = [r.target for r in refs]
    by_frame = {}
    for name, f in frames.items():
        preds = [mask_prediction(p, f, r.target, m) for p, r, m in zip(parsed, refs, fields, strict=True)]
        by_frame[name] = mask_figures(preds, targets, kinds=kinds and name == frame)
    metrics = by_frame[frame]
    return ScoreReport(
        answers_file=answers_file, split=split, codec=codec, frame=frame, samples=len(refs), answered=len(answered),
        missing=len(refs) - len(answered), parse_failures=len(failures),
        truncated=sum(p.truncated for _, p, _ in answered if p.parsed),
        several_boxes=sum(len(p.polygons) > 1 for _, p, _ in answered),
        forms=dict(Counter(p.form for _, p, m in answered if m is not None or p.parsed)), metrics=metrics,
        by_frame={n: {k: v for k, v in fig.items() if "/" not in k} for n, fig in by_frame.items()},
        failure_examples=_failure_examples(failures), task="res",
        details={"dropped_polygons": sum(p.dropped for _, p, _ in answered),
                 "segmentation_fields": sum(m is not None for _, _, m in answered)},
    )


def _resolved_answer(answer: Answer | None, unit: Any, names: Mapping[str, int], reader) -> Any:
    """One image's answer parsed and its labels resolved; an answer in several parts (one per
    category's sample, from vlzoo predict) is their boxes together, an unlabelled box taking its
    part's category."""
    if answer is None:
        return resolve_objects(ParsedObjects(failure="no answer"), unit, names)
    if len(answer.parts) <= 1:
        category = next(iter(answer.parts), None)
        parsed = parse_objects(answer.text, reader)
        return resolve_objects(parsed, unit, names, defaults=[category] * len(parsed.boxes))
    pieces = [(category, parse_objects(text, reader)) for category, text in answer.parts.items()]
    failed = [p for _, p in pieces if not p.parsed]
    merged = ParsedObjects(form=next((p.form for _, p in pieces if p.parsed and p.boxes), pieces[0][1].form),
                           fractions=any(p.fractions for _, p in pieces),
                           truncated=any(p.truncated for _, p in pieces))
    if len({p.fractions for _, p in pieces if p.boxes}) > 1:
        merged.failure = "the parts of this image's answer mix coordinate tokens and plain numbers"
    elif len(failed) == len(pieces):
        merged.failure = failed[0].failure
    defaults: list[int | None] = []
    merged.failed_parts = len(failed) if merged.failure is None else 0
    merged.skipped = sum(p.skipped for _, p in pieces)
    for category, p in pieces:
        merged.boxes.extend(p.boxes)
        merged.labels.extend(p.labels)
        defaults.extend([category] * len(p.boxes))
    return resolve_objects(merged, unit, names, defaults=defaults)


def _score_detections(answers: list[Answer], refs: list[Reference], frames: dict[str, Frame], frame: str, reader,
                      *, codec: str, answers_file: str, split: str) -> ScoreReport:
    """``--task det``: labelled boxes per image -> DetectionMAP, labels mapped to the split's categories."""
    units = detection_units(refs)
    names = category_names(refs)
    index = {u.image_id: i for i, u in enumerate(units)}
    matched: list[Answer | None] = [None] * len(units)
    for answer in answers:
        if answer.key[0] != "image_id":
            raise AnswersError(f"{answers_file} {answer.place}: detection answers are keyed by image_id (one answer "
                               f"lists every object of an image), not {answer.key[0]}")
        i = index.get(answer.key[1])
        if i is None:
            raise AnswersError(f"{answers_file} {answer.place}: image_id {answer.key[1]!r} is not an image of the "
                               "split's det samples; check --recipe / --split (and the recipe's seed)")
        matched[i] = answer
    resolved = [_resolved_answer(a, u, names, reader) for a, u in zip(matched, units, strict=True)]
    answered = [(a, r) for a, r in zip(matched, resolved, strict=True) if a is not None]
    failures = [(a, r.parsed) for a, r in answered if not r.parsed.parsed]
    targets = [u.target for u in units]
    by_frame = {}
    for name, f in frames.items():
        preds = [detection_prediction(r, f, t) for r, t in zip(resolved, targets, strict=True)]
        by_frame[name] = detection_figures(preds, targets)
    unknown = unknown_summary(resolved)
    return ScoreReport(
        answers_file=answers_file, split=split, codec=codec, frame=frame, samples=len(units),
        answered=len(answered), missing=len(units) - len(answered), parse_failures=len(failures),
        truncated=sum(r.parsed.truncated for _, r in answered if r.parsed.parsed),
        several_boxes=sum(len(r.parsed.boxes) > 1 for _, r in answered),
        forms=dict(Counter(r.parsed.form for _, r in answered if r.parsed.parsed)), metrics=by_frame[frame],
        by_frame=by_frame, failure_examples=_failure_examples(failures), task="det",
        details={"boxes": sum(len(r.parsed.boxes) for _, r in answered),
                 "scored_boxes": sum(c is not None for _, r in answered for c in r.ids),
                 "unknown_labels": sum(unknown.values()), "unknown_label_names": unknown,
                 "unlabelled": sum(r.unlabelled for _, r in answered),
                 "unparsed_parts": sum(r.parsed.failed_parts for _, r in answered),
                 "skipped_groups": sum(r.parsed.skipped for _, r in answered),
                 "categories": sorted(names, key=names.get)},
    )


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
