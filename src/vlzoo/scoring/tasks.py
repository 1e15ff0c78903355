"""``vlzoo score --task res`` and ``--task det``: masks and labelled boxes from any model's answers.

* **RES** (``res`` samples of the split): each answer's polygons
  (:func:`~vlzoo.scoring.objects_parser.parse_polygons`) are mapped to original pixels through the
  declared frame and rasterised with :func:`vlzoo.structures.polygon_to_mask` (their union is the
  answer's mask); a record's ``segmentation`` field (COCO RLE, compressed or not, or COCO polygons,
  in original pixels: what ``vlzoo predict`` writes) is read with pycocotools instead and wins over
  the text.  Scored by :class:`~vlzoo.evaluation.referring.ReferringSegmentation` (cIoU, gIoU,
  Prec@t).
* **Detection** (``det`` samples): each answer's labelled boxes
  (:func:`~vlzoo.scoring.objects_parser.parse_objects`) are mapped through the frame, their labels
  to the split's categories (:func:`resolve_label`) and scored by
  :class:`~vlzoo.evaluation.detection.DetectionMAP` (COCO AP; answers carry no scores, so the boxes
  rank in the order written).  The ``det`` samples of one image are one scoring unit (their
  instances together), answered by one ``image_id`` record.  A box whose label names no category
  of the split is *counted* (``unknown_labels``, with the names) and not scored - it could match no
  ground truth of any category - and an unlabelled box gets the category of its unit when the
  unit has one (the prompt named it), else it is counted as ``unlabelled``.

Unparsed answers and unanswered samples are misses, as for REC, and the every-frame diagnostic
warns when another frame fits far better (on cIoU / AP).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from vlzoo.data.frames import Frame
from vlzoo.evaluation.detection import DetectionMAP
from vlzoo.evaluation.referring import ReferringSegmentation
from vlzoo.scoring.answers_parser import ParsedAnswer
from vlzoo.scoring.objects_parser import ParsedObjects, ParsedPolygons
from vlzoo.structures import Predictions, Targets, polygon_to_mask

__all__ = [
    "SCORED_TASKS",
    "PRIMARY",
    "resolve_label",
    "category_names",
    "decode_segmentation",
    "points_to_original",
    "mask_prediction",
    "mask_figures",
    "detection_units",
    "DetectionUnit",
    "ResolvedObjects",
    "resolve_objects",
    "detection_prediction",
    "box_prediction",
    "detection_figures",
    "unknown_summary",
]

#: the tasks ``vlzoo score`` scores, and the figure each one's diagnostic compares frames on
SCORED_TASKS = ("rec", "res", "det")
PRIMARY = {"res": "ciou", "det": "map"}
_ARTICLES = re.compile(r"^(?:a|an|the|some|all|every)\s+")


# --------------------------------------------------------------------------------------------- labels
def _normal(name: str) -> str:
    text = re.sub(r"[^\w\s-]", " ", name.lower()).replace("_", " ")
    text = re.sub(r"\s+", " ", text).strip()
    return _ARTICLES.sub("", text)


def category_names(refs: Sequence[Any]) -> dict[str, int]:
    """``normalised name -> category id`` of the categories the split's samples name."""
    out: dict[str, int] = {}
    for ref in refs:
        if ref.category_name is not None and ref.category_id is not None:
            out.setdefault(_normal(ref.category_name), int(ref.category_id))
    return out


def resolve_label(label: str, names: Mapping[str, int]) -> int | None:
    """The category id a label names, ``None`` when none: case, articles and punctuation are
    ignored; then the label itself, its last word singular (``circles`` / ``crosses``), or the
    longest category name it ends with (``red circle`` -> ``circle``)."""
    text = _normal(label)
    if not text:
        return None
    words = text.split(" ")
    last = words[-1]
    candidates = [text]
    for cut in ("es", "s"):
        if last.endswith(cut) and len(last) > len(cut) + 1:
            candidates.append(" ".join([*words[:-1], last[: -len(cut)]]))
    for candidate in candidates:
        if candidate in names:
            return names[candidate]
    for candidate in candidates:
        ends = [n for n in names if candidate.endswith(" " + n)]
        if ends:
            return names[max(ends, key=len)]
    return None


# --------------------------------------------------------------------------------------------- geometry
def points_to_original(points: Sequence[Sequence[float]] | torch.Tensor, frame: Frame, size: tuple[int, int],
                       *, fractions: bool) -> torch.Tensor:
    """Polygon vertices ``(P, 2)`` written in ``frame`` (or as fractions of its reference image)
    -> original pixels (float64, not clamped: :func:`~vlzoo.structures.polygon_to_mask` cuts a
    polygon at the image border itself)."""
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    ref_h, ref_w = frame.reference_size(size)
    unit_h, unit_w = frame.units(size)
    if fractions:
        ref = pts * torch.tensor([ref_w, ref_h], dtype=torch.float64)
    elif (unit_h, unit_w) == (float(ref_h), float(ref_w)):
        ref = pts  # a pixel frame: its units are the reference image's pixels
    else:
        ref = pts / torch.tensor([unit_w, unit_h], dtype=torch.float64) * torch.tensor([ref_w, ref_h],
                                                                                       dtype=torch.float64)
    geo = frame.transform(size)
    scale = torch.tensor(geo.scale, dtype=torch.float64)
    offset = torch.tensor(geo.offset, dtype=torch.float64)
    return (ref - offset) / scale


def decode_segmentation(segmentation: Any, size: tuple[int, int], where: str) -> torch.Tensor:
    """A COCO ``segmentation`` (RLE with text or list counts, or a list of flat polygons) as a
    boolean ``(H, W)`` mask of the original image; :class:`ValueError` naming ``where`` when it
    is malformed or of another size."""
    h, w = size
    if isinstance(segmentation, dict):
        rle_size = segmentation.get("size")
        counts = segmentation.get("counts")
        if not (isinstance(rle_size, list) and len(rle_size) == 2) or counts is None:
            raise ValueError(f"{where}: 'segmentation' is a mapping but not a COCO RLE "
                             "({'size': [H, W], 'counts': ...})")
        if [int(v) for v in rle_size] != [h, w]:
            raise ValueError(f"{where}: the RLE is {rle_size[0]}x{rle_size[1]} but the image is {h}x{w}; "
                             "write masks in original-image pixels")
        rle = mask_utils.frPyObjects(segmentation, h, w) if isinstance(counts, list) else {
            "size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        try:
            return torch.from_numpy(mask_utils.decode(rle).astype(bool))
        except Exception as err:  # pycocotools raises bare errors on bad counts
            raise ValueError(f"{where}: the RLE does not decode ({err})") from None
    if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
        mask = torch.zeros((h, w), dtype=torch.bool)
        for poly in segmentation:
            if len(poly) < 6 or len(poly) % 2 or not all(isinstance(v, (int, float)) for v in poly):
                raise ValueError(f"{where}: a COCO polygon is a flat list of 6+ numbers [x1, y1, x2, y2, ...]")
            mask |= polygon_to_mask(torch.tensor(poly, dtype=torch.float64).reshape(-1, 2), (h, w))
        return mask
    raise ValueError(f"{where}: 'segmentation' must be a COCO RLE or a list of polygons, got "
                     f"{type(segmentation).__name__}")


# --------------------------------------------------------------------------------------------- RES
def mask_prediction(parsed: ParsedPolygons, frame: Frame, target: Targets,
                    masks: torch.Tensor | None = None) -> Predictions:
    """The answer's mask in original pixels (``masks``: already decoded from a record's field)."""
    size = tuple(int(v) for v in target.image_size)
    if masks is None:
        if not parsed.parsed:
            return Predictions(parsed=False, image_id=target.image_id, image_size=size)
        masks = torch.zeros(size, dtype=torch.bool)
        for poly in parsed.polygons:
            masks |= polygon_to_mask(points_to_original(poly, frame, size, fractions=parsed.fractions), size)
    return Predictions(masks=masks.reshape(1, *size), image_id=target.image_id, image_size=size)


def mask_figures(preds: list[Predictions], targets: list[Targets], *, kinds: bool) -> dict[str, float]:
    metric = ReferringSegmentation() if kinds else ReferringSegmentation(kinds=())
    metric.update(preds, targets)
    return {k: round(float(v), 6) for k, v in metric.compute().items()}


# --------------------------------------------------------------------------------------------- detection
@dataclass
class DetectionUnit:
    """The ``det`` samples of one image, scored together: their instances and categories."""

    image_id: Any
    target: Targets
    categories: tuple[int, ...]


def detection_units(refs: Sequence[Any]) -> list[DetectionUnit]:
    """One unit per image: the ``det`` references of an ``image_id`` merged (boxes, labels and
    crowd flags laid end to end), in the order the images first appear."""
    grouped: dict[Any, list[Any]] = {}
    for ref in refs:
        grouped.setdefault(ref.ids["image_id"], []).append(ref)
    units = []
    for image_id, group in grouped.items():
        targets = [r.target for r in group]
        crowd = None
        if any(t.iscrowd is not None for t in targets):
            crowd = torch.cat([t.iscrowd.reshape(-1).bool() if t.iscrowd is not None
                               else torch.zeros(len(t), dtype=torch.bool) for t in targets])
        merged = Targets(boxes=torch.cat([t.boxes.reshape(-1, 4).float() for t in targets]),
                         labels=torch.cat([t.labels.reshape(-1).long() for t in targets]), iscrowd=crowd,
                         image_id=int(image_id) if isinstance(image_id, (int, np.integer)) else 0,
                         image_size=tuple(targets[0].image_size))
        cats = tuple(dict.fromkeys(int(r.category_id) for r in group if r.category_id is not None))
        units.append(DetectionUnit(image_id=image_id, target=merged, categories=cats))
    return units


@dataclass
class ResolvedObjects:
    """A parsed detection answer with its labels resolved to category ids (``ids``; ``None`` for
    a box that is not scored) and what was not resolved."""

    parsed: ParsedObjects
    ids: list[int | None]
    unknown: list[str]
    unlabelled: int


def resolve_objects(parsed: ParsedObjects, unit: DetectionUnit, names: Mapping[str, int],
                    defaults: Sequence[int | None] | None = None) -> ResolvedObjects:
    """Category ids of a parsed answer's boxes: a label by :func:`resolve_label`; an unlabelled
    box by ``defaults`` (the category its record names), else the unit's category when it has one."""
    ids: list[int | None] = []
    unknown: list[str] = []
    unlabelled = 0
    for i, label in enumerate(parsed.labels):
        if label is None:
            if defaults is not None and defaults[i] is not None:
                ids.append(int(defaults[i]))
            elif len(unit.categories) == 1:
                ids.append(unit.categories[0])
            else:
                ids.append(None)
                unlabelled += 1
            continue
        cat = resolve_label(label, names)
        ids.append(cat)
        if cat is None:
            unknown.append(label)
    return ResolvedObjects(parsed=parsed, ids=ids, unknown=unknown, unlabelled=unlabelled)


def box_prediction(parsed: ParsedAnswer, frame: Frame, target: Targets) -> Predictions:
    """A parsed box answer as a prediction in original pixels, through the declared frame."""
    size = target.image_size
    if not parsed.parsed:
        return Predictions(parsed=False, image_id=target.image_id, image_size=size)
    boxes = torch.tensor(parsed.boxes, dtype=torch.float64).reshape(-1, 4)
    # a box written corner-swapped (x2 < x1) is read as the box the two corners span
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    mapped = frame.fractions_to_original(boxes, size) if parsed.fractions else frame.to_original(boxes, size)
    return Predictions(boxes=mapped, image_id=target.image_id, image_size=size)


def detection_prediction(resolved: ResolvedObjects, frame: Frame, target: Targets) -> Predictions:
    parsed = resolved.parsed
    if not parsed.parsed:
        return Predictions(parsed=False, image_id=target.image_id, image_size=target.image_size)
    keep = [i for i, c in enumerate(resolved.ids) if c is not None]
    if not keep:
        return Predictions(image_id=target.image_id, image_size=target.image_size)
    boxes = ParsedAnswer(boxes=[parsed.boxes[i] for i in keep], fractions=parsed.fractions)
    pred = box_prediction(boxes, frame, target)
    return pred.replace(labels=torch.tensor([resolved.ids[i] for i in keep], dtype=torch.long))


def detection_figures(preds: list[Predictions], targets: list[Targets]) -> dict[str, float]:
    metric = DetectionMAP(iou_type="bbox")
    metric.update(preds, targets)
    return {k: round(float(v), 6) for k, v in metric.compute().items()}


def unknown_summary(resolved: Sequence[ResolvedObjects]) -> dict[str, int]:
    """The unknown label names, most frequent first."""
    return dict(Counter(name for r in resolved for name in r.unknown).most_common())
