"""COCO instances and person-keypoints readers: detection, instance segmentation and pose.

One sample per (image, category present, task): ``det`` targets every box of the category,
``seg`` also its masks (polygons or RLE, decoded with pycocotools), ``pose`` its keypoints
(only categories whose COCO entry lists ``keypoints`` and annotations with ``num_keypoints >
0``).  Crowd annotations are kept with ``iscrowd=True`` (COCO evaluation ignores them).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from vlzoo.data.errors import DataError
from vlzoo.data.images import load_image
from vlzoo.data.templates import instruction
from vlzoo.structures import Sample, Targets

__all__ = ["CocoDataset", "load_coco_json", "index_images", "index_categories", "decode_segmentation", "check_box"]

_COCO_TASKS = ("det", "seg", "pose")
#: What to do about a bad annotation (appended to the messages of records checked while loading).
SKIP_RECORD_HINT = "fix or remove the record, or set on_bad_sample: skip on the dataset to leave bad records out"
#: What to do about a bad sample found while reading it (image, mask, keypoints).
SKIP_SAMPLE_HINT = (
    "fix or remove it, or set on_bad_sample: skip on the datamodule (data.on_bad_sample=skip) to leave such "
    "samples out"
)


def load_coco_json(path: str | Path, *, required: Sequence[str] = ("images", "annotations", "categories")) -> dict:
    """Parse a COCO-style JSON file; :class:`DataError` naming the file when it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: annotation file not found; check the recipe's path to it (and the COCO_ROOT / "
            "REFCOCO_ROOT folder it may be read from)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON: {e}; the file is damaged or cut short, get or export it again") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the annotation file: {e}") from e
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in required):
        raise DataError(f"{path}: not a COCO file (needs lists {list(required)})")
    return data


def _record_int(record: Any, field: str, where: str, *, positive: bool = False) -> int:
    value = record.get(field) if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DataError(f"{where}: field '{field}' must be an integer, got {value!r}")
    if positive and value <= 0:
        raise DataError(f"{where}: field '{field}' must be > 0, got {value!r}")
    return int(value)


def index_images(data: dict, path: str | Path) -> dict[int, dict]:
    """``id -> image record`` of a COCO file; :class:`DataError` naming the record when one has
    no integer ``id``, no ``file_name`` or no positive ``height`` / ``width``."""
    images: dict[int, dict] = {}
    for i, im in enumerate(data["images"]):
        where = f"{path} images[{i}]" + (f" (id {im.get('id')})" if isinstance(im, dict) and "id" in im else "")
        if not isinstance(im, dict):
            raise DataError(f"{where}: an image record must be a mapping, got {type(im).__name__}")
        image_id = _record_int(im, "id", where)
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise DataError(f"{where}: field 'file_name' is missing or not text")
        _record_int(im, "height", where, positive=True)
        _record_int(im, "width", where, positive=True)
        images[image_id] = im
    return images


def index_categories(data: dict, path: str | Path) -> dict[int, dict]:
    """``id -> category record`` of a COCO file; :class:`DataError` naming the record when one
    has no integer ``id`` or no ``name``."""
    categories: dict[int, dict] = {}
    for i, cat in enumerate(data["categories"]):
        where = f"{path} categories[{i}]"
        if not isinstance(cat, dict):
            raise DataError(f"{where}: a category record must be a mapping, got {type(cat).__name__}")
        cat_id = _record_int(cat, "id", where)
        if not isinstance(cat.get("name"), str):
            raise DataError(f"{where} (id {cat_id}): field 'name' is missing or not text")
        categories[cat_id] = cat
    return categories


def check_box(bbox: Any, height: int, width: int, where: str) -> list[float]:
    """COCO ``[x, y, w, h]`` -> xyxy; :class:`DataError` for NaN, degenerate or outside boxes."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: bbox {bbox!r} is not numeric") from e
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DataError(f"{where}: bbox {bbox!r} is not finite")
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: degenerate bbox {bbox!r} (width and height must be > 0)")
    tol = 1.0  # COCO boxes may overrun the border by rounding
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise DataError(f"{where}: bbox {bbox!r} lies outside the {width}x{height} image")
    return [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]


def decode_segmentation(segm: Any, height: int, width: int, where: str) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE -> ``(H, W)`` bool; :class:`DataError` if empty."""
    try:
        if isinstance(segm, list):
            rles = mask_utils.frPyObjects(segm, height, width)
            rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, height, width)
        elif isinstance(segm, dict):
            rle = dict(segm)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        else:
            raise TypeError(f"unknown segmentation type {type(segm).__name__}")
        m = mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise DataError(f"{where}: cannot decode segmentation: {e}; {SKIP_SAMPLE_HINT}") from e
    if m.ndim == 3:
        m = m.any(-1)
    if not m.any():
        raise DataError(f"{where}: empty mask; {SKIP_SAMPLE_HINT}")
    return m


class CocoDataset(Dataset):
    """COCO instances / person keypoints as det / seg / pose samples.

    Args:
        annotation_file: ``instances_*.json`` or ``person_keypoints_*.json``.
        image_dir: folder holding the images named by ``file_name``.
        tasks: any of ``det``, ``seg``, ``pose``; each gives one sample per (image, category).
        categories: restrict to these category names (default all).
        on_bad_sample: ``"error"`` raises :class:`DataError` on the first bad annotation;
            ``"skip"`` drops bad annotations while loading (counted in ``num_skipped``) and bad
            images when read (counted by the datamodule).
        seed: picks the instruction phrasing per item (injected).
    """

    def __init__(
        self,
        *,
        annotation_file: str | Path,
        image_dir: str | Path,
        tasks: Sequence[str] = ("det",),
        categories: Sequence[str] | None = None,
        on_bad_sample: str = "error",
        seed: int = 0,
    ) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"CocoDataset: on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        bad = [t for t in tasks if t not in _COCO_TASKS]
        if bad:
            raise ValueError(f"CocoDataset: tasks {bad} not supported; choose from {_COCO_TASKS}")
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.tasks = list(tasks)
        self.on_bad_sample = on_bad_sample
        self.seed = int(seed)
        self.num_skipped = 0
        data = load_coco_json(self.annotation_file)
        self.categories = index_categories(data, self.annotation_file)
        self.images = index_images(data, self.annotation_file)
        wanted = None if categories is None else set(categories)
        self.anns: dict[int, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise DataError(
                    f"{self.annotation_file} annotations[{i}]: an annotation must be a mapping, got {type(ann).__name__}"
                )
            try:
                self._check(ann)
            except DataError:
                if on_bad_sample == "error":
                    raise
                self.num_skipped += 1
                continue
            if wanted is not None and self.categories[int(ann["category_id"])]["name"] not in wanted:
                continue
            self.anns[int(ann["image_id"])][int(ann["category_id"])].append(ann)
        self.items: list[tuple[str, int, int]] = []
        for task in self.tasks:
            for image_id in sorted(self.anns):
                for cat_id in sorted(self.anns[image_id]):
                    anns = self.anns[image_id][cat_id]
                    if task == "pose":
                        if not self.categories[cat_id].get("keypoints"):
                            continue
                        if not any(a.get("num_keypoints", 0) > 0 for a in anns):
                            continue
                    if all(a.get("iscrowd", 0) for a in anns):
                        continue
                    self.items.append((task, image_id, cat_id))

    def _check(self, ann: dict) -> None:
        where = f"{self.annotation_file} annotation {ann.get('id', '?')}"
        try:
            if "id" not in ann:
                raise DataError(f"{where}: field 'id' is missing")
            image_id, cat_id = ann.get("image_id"), ann.get("category_id")
            if not isinstance(image_id, int) or image_id not in self.images:
                raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
            if not isinstance(cat_id, int) or cat_id not in self.categories:
                raise DataError(f"{where}: category_id {cat_id!r} is not in 'categories'")
            im = self.images[image_id]
            ann["_xyxy"] = check_box(ann.get("bbox"), int(im["height"]), int(im["width"]), where)
        except DataError as err:
            raise DataError(f"{err}; {SKIP_RECORD_HINT}") from None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        task, image_id, cat_id = self.items[index]
        info = self.images[image_id]
        image = load_image(self.image_dir / info["file_name"], record=f"image {image_id} of {self.annotation_file}")
        h, w = int(image.shape[1]), int(image.shape[2])
        if (h, w) != (int(info["height"]), int(info["width"])):
            raise DataError(
                f"{self.image_dir / info['file_name']} (image {image_id} of {self.annotation_file}): size {w}x{h} "
                f"differs from the annotation's {info['width']}x{info['height']}; {SKIP_SAMPLE_HINT}"
            )
        anns = self.anns[image_id][cat_id]
        if task == "pose":
            anns = [a for a in anns if a.get("num_keypoints", 0) > 0 or a.get("iscrowd", 0)]
        name = self.categories[cat_id]["name"]
        targets = Targets(
            boxes=torch.tensor([a["_xyxy"] for a in anns], dtype=torch.float32).reshape(-1, 4),
            labels=torch.full((len(anns),), cat_id, dtype=torch.long),
            iscrowd=torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
            areas=torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            image_id=image_id,
            image_size=(h, w),
        )
        if task == "seg":
            masks = [
                decode_segmentation(a.get("segmentation"), h, w, f"{self.annotation_file} annotation {a.get('id')}")
                for a in anns
            ]
            targets.masks = torch.from_numpy(np.stack(masks))
        if task == "pose":
            k = len(self.categories[cat_id]["keypoints"])
            kps = []
            for a in anns:
                kp = np.asarray(a.get("keypoints") or [0.0] * (3 * k), dtype=np.float32)
                if kp.size != 3 * k:
                    raise DataError(
                        f"{self.annotation_file} annotation {a.get('id')}: expected {3 * k} keypoint values, "
                        f"got {kp.size}; {SKIP_SAMPLE_HINT}"
                    )
                kps.append(kp.reshape(k, 3))
            targets.keypoints = torch.from_numpy(np.stack(kps))
        rng = np.random.default_rng([self.seed, index])
        meta = {"annotation_ids": [int(a["id"]) for a in anns], "file_name": info["file_name"]}
        return Sample(
            image, task, instruction(task, rng, category=name), targets, image_id=image_id,
            category_id=int(cat_id), category_name=name, meta=meta,
        )
