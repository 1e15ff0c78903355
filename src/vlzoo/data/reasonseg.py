"""ReasonSeg (LISA's reasoning segmentation) in its release format.

A split folder (``ReasonSeg/train``, ``val``, ``test``) holds one image and one JSON per example,
with the same stem (``<name>.jpg`` + ``<name>.json``).  The JSON has ``text`` (a list of
queries, several phrasings of one question), ``is_sentence`` (``false``: a short query, a
phrase; ``true``: a long query, a sentence) and ``shapes``: polygons ``{"label", "points":
[[x, y], ...]}`` whose label is ``target``, contains ``ignore`` (pixels left out of scoring) or
is ``flag`` (deprecated, skipped).  As LISA's loader does, the polygons are painted from the
largest area to the smallest (a smaller polygon overwrites a larger one; of equal areas the one
listed first is painted last): the target mask is the pixels painted ``target``, the ignore
region the pixels painted ``ignore``.  Polygons are rasterised by pycocotools (LISA uses
OpenCV's ``fillPoly`` plus a one-pixel outline, so boundary pixels can differ).

One sample per example (LISA's evaluation reads the first query of each image) or, with
``phrasings="all"``, one per query.  ``Targets.masks`` is the target mask ``(1, H, W)`` with its
tight box, or ``(0, H, W)`` when nothing is painted ``target``; the ignore region travels as
:class:`~vlzoo.evaluation.generalized.TargetsWithIgnore` ``.ignore_mask``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from vlzoo.data.coco import SKIP_RECORD_HINT
from vlzoo.data.errors import DataError
from vlzoo.data.images import load_image
from vlzoo.data.templates import instruction
from vlzoo.evaluation.generalized import TargetsWithIgnore
from vlzoo.structures import Sample

__all__ = ["ReasonSegDataset", "read_reasonseg_json", "paint_reasonseg", "IMAGE_SUFFIXES", "LONG_QUERY_INSTRUCTION"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: the instruction of a long query (a sentence): the query, then what to output
LONG_QUERY_INSTRUCTION = "{query} give the mask of the answer."
_QUERIES = ("short", "long", "all")
_PHRASINGS = ("first", "all")


def read_reasonseg_json(path: str | Path) -> dict:
    """The checked content of one ReasonSeg JSON: ``{"text": [str, ...], "is_sentence": bool,
    "shapes": [{"label": str, "points": [[x, y], ...]}, ...]}``; :class:`DataError` naming the
    file and the field otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the ReasonSeg annotation: {e}") from e
    try:
        try:
            text_of_file = raw.decode("utf-8")
        except UnicodeDecodeError:  # some released files are Windows-1252, which LISA's loader also reads
            text_of_file = raw.decode("cp1252", errors="replace")
        data = json.loads(text_of_file)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e}; {SKIP_RECORD_HINT}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: a ReasonSeg annotation is a JSON object, got {type(data).__name__}; {SKIP_RECORD_HINT}")
    text = data.get("text")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not text or not all(isinstance(t, str) and t.strip() for t in text):
        raise DataError(f"{path}: field 'text' must be a non-empty list of queries, got {data.get('text')!r}; "
                        f"{SKIP_RECORD_HINT}")
    if not isinstance(data.get("is_sentence"), bool):
        raise DataError(f"{path}: field 'is_sentence' must be true or false, got {data.get('is_sentence')!r}; "
                        f"{SKIP_RECORD_HINT}")
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise DataError(f"{path}: field 'shapes' must be a list of polygons, got {type(shapes).__name__}; "
                        f"{SKIP_RECORD_HINT}")
    for k, s in enumerate(shapes):
        where = f"{path} shapes[{k}]"
        if not isinstance(s, dict) or not isinstance(s.get("label"), str):
            raise DataError(f"{where}: a shape needs a text 'label' (target / ignore / flag); {SKIP_RECORD_HINT}")
        if s["label"].lower() == "flag":
            continue
        pts = s.get("points")
        ok = isinstance(pts, list) and len(pts) >= 3 and all(
            isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
            for p in pts
        )
        if not ok:
            raise DataError(f"{where} (label {s['label']!r}): 'points' must be at least 3 finite [x, y] pairs; "
                            f"{SKIP_RECORD_HINT}")
    return {"text": [t.strip() for t in text], "is_sentence": data["is_sentence"], "shapes": shapes}


def paint_reasonseg(shapes: Sequence[dict], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(target, ignore)`` ``(H, W)`` bool masks of checked ReasonSeg shapes, painted largest
    area first (see the module docstring)."""
    painted = []
    for s in shapes:
        if s["label"].lower() == "flag":
            continue
        poly = [float(v) for p in s["points"] for v in p]
        rle = mask_utils.frPyObjects([poly], height, width)
        m = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
        painted.append((int(m.sum()), len(painted), m, "ignore" in s["label"].lower()))
    label = np.zeros((height, width), dtype=np.uint8)  # 0 background, 1 target, 255 ignore
    for _, _, m, ignored in sorted(painted, key=lambda x: (x[0], x[1]), reverse=True):
        label[m] = 255 if ignored else 1
    return label == 1, label == 255


class ReasonSegDataset(Dataset):
    """ReasonSeg examples as ``res`` samples with an ignore region.

    Args:
        data_dir: the ``ReasonSeg`` folder (holding ``train`` / ``val`` / ``test``).
        split: the split folder to read.
        queries: ``"short"`` (``is_sentence`` false), ``"long"`` (true) or ``"all"`` - LISA reports
            ReasonSeg test as short query, long query and overall.
        phrasings: ``"first"`` (the first query of each example, LISA's evaluation) or ``"all"``
            (one sample per query).
        on_bad_sample: ``"error"`` raises on the first bad annotation; ``"skip"`` leaves bad
            annotations out while loading (``num_skipped``).
        seed: picks the instruction phrasing of short queries.
        task: the task of every sample: ``"res"``, or ``"gres"`` to be scored by the generalized
            metrics, which apply the ignore region and count an empty target answered empty as
            IoU 1 (LISA's gIoU / cIoU; docs/evaluation.md); the ``Evaluator``'s ``res`` metric
            does not read the ignore region.

    ``meta``: ``file_name``, ``json_file``, ``is_sentence``, ``query_index``.
    """

    def __init__(
        self,
        *,
        data_dir: str | Path,
        split: str = "val",
        queries: str = "all",
        phrasings: str = "first",
        on_bad_sample: str = "error",
        seed: int = 0,
        task: str = "res",
    ) -> None:
        if task not in ("res", "gres"):
            raise ValueError(f"ReasonSegDataset: task must be 'res' or 'gres', got {task!r}")
        self.task = task
        if queries not in _QUERIES:
            raise ValueError(f"ReasonSegDataset: queries must be one of {_QUERIES}, got {queries!r}")
        if phrasings not in _PHRASINGS:
            raise ValueError(f"ReasonSegDataset: phrasings must be one of {_PHRASINGS}, got {phrasings!r}")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"ReasonSegDataset: on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.split_dir = Path(data_dir) / split
        if not self.split_dir.is_dir():
            raise DataError(f"{self.split_dir}: ReasonSeg split folder not found; check data_dir (the folder holding "
                            "train/ val/ test/) and split")
        self.queries, self.phrasings, self.seed = queries, phrasings, int(seed)
        self.num_skipped = 0
        self.items: list[tuple[Path, Path, dict, int]] = []
        files = sorted(self.split_dir.glob("*.json"))
        if not files:
            raise DataError(f"{self.split_dir}: no ReasonSeg annotations (*.json) in the split folder")
        for path in files:
            try:
                record = read_reasonseg_json(path)
                image = next((path.with_suffix(s) for s in IMAGE_SUFFIXES if path.with_suffix(s).is_file()), None)
                if image is None:
                    raise DataError(f"{path}: no image beside it ({', '.join(path.stem + s for s in IMAGE_SUFFIXES)}); "
                                    f"{SKIP_RECORD_HINT}")
            except DataError:
                if on_bad_sample == "error":
                    raise
                self.num_skipped += 1
                continue
            if queries != "all" and record["is_sentence"] != (queries == "long"):
                continue
            for q in range(len(record["text"]) if phrasings == "all" else 1):
                self.items.append((path, image, record, q))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        path, image_path, record, q = self.items[index]
        image = load_image(image_path, record=f"annotation {path}")
        h, w = int(image.shape[1]), int(image.shape[2])
        target, ignore = paint_reasonseg(record["shapes"], h, w)
        if target.any():
            ys, xs = np.nonzero(target)
            boxes = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            masks = torch.from_numpy(target[None])
        else:
            boxes, masks = torch.zeros((0, 4)), torch.zeros((0, h, w), dtype=torch.bool)
        query = record["text"][q]
        image_id = index
        targets = TargetsWithIgnore(
            boxes=boxes, labels=torch.zeros(len(boxes), dtype=torch.long), masks=masks,
            iscrowd=torch.zeros(len(boxes), dtype=torch.bool), areas=masks.flatten(1).sum(1).float(),
            expressions=[query], image_id=image_id, image_size=(h, w), ignore_mask=torch.from_numpy(ignore),
        )
        if record["is_sentence"]:
            prompt = LONG_QUERY_INSTRUCTION.format(query=query)
        else:
            prompt = instruction(self.task, np.random.default_rng([self.seed, index]), expr=query)
        meta: dict[str, Any] = {"file_name": image_path.name, "json_file": str(path),
                                "is_sentence": record["is_sentence"], "query_index": q}
        return Sample(image, self.task, prompt, targets, image_id=image_id, meta=meta)
