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

__all__ = ["CocoDataset", "load_coco_json", "decode_segmentation", "check_box"]

_COCO_TASKS = ("det", "seg", "pose")


def load_coco_json(path: str | Path, *, required: Sequence[str] = ("images", "annotations", "categories")) -> dict:
    """Parse a COCO-style JSON file; :class:`DataError` naming the file when it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON: {e}") from e
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in required):
        raise DataError(f"{path}: not a COCO file (needs lists {list(required)})")
    return data


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
        raise DataError(f"{where}: cannot decode segmentation: {e}") from e
    if m.ndim == 3:
        m = m.any(-1)
    if not m.any():
        raise DataError(f"{where}: empty mask")
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
        self.categories = {int(c["id"]): c for c in data["categories"]}
        self.images = {int(im["id"]): im for im in data["images"]}
        wanted = None if categories is None else set(categories)
        self.anns: dict[int, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for ann in data["annotations"]:
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
        if int(ann.get("image_id", -1)) not in self.images:
            raise DataError(f"{where}: image_id {ann.get('image_id')} is not in 'images'")
        if int(ann.get("category_id", -1)) not in self.categories:
            raise DataError(f"{where}: category_id {ann.get('category_id')} is not in 'categories'")
        im = self.images[int(ann["image_id"])]
        ann["_xyxy"] = check_box(ann.get("bbox"), int(im["height"]), int(im["width"]), where)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        task, image_id, cat_id = self.items[index]
        info = self.images[image_id]
        image = load_image(self.image_dir / info["file_name"], record=f"image {image_id} of {self.annotation_file}")
        h, w = int(image.shape[1]), int(image.shape[2])
        if (h, w) != (int(info["height"]), int(info["width"])):
            raise DataError(
                f"{self.image_dir / info['file_name']} (image {image_id}): size {w}x{h} differs from "
                f"the annotation's {info['width']}x{info['height']}"
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
                    raise DataError(f"{self.annotation_file} annotation {a.get('id')}: expected {3 * k} keypoint values")
                kps.append(kp.reshape(k, 3))
            targets.keypoints = torch.from_numpy(np.stack(kps))
        rng = np.random.default_rng([self.seed, index])
        meta = {"category": name, "annotation_ids": [int(a["id"]) for a in anns], "file_name": info["file_name"]}
        return Sample(image, task, instruction(task, rng, category=name), targets, image_id=image_id, meta=meta)
