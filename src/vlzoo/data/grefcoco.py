"""gRefCOCO (generalized referring expressions: no target, one or several) in its release format.

A release folder holds ``grefs(unc).json`` (or the pickle ``grefs(unc).p``, read with the same
restricted unpickler as the REFER refs) and ``instances.json`` (COCO annotations).  Each ref has
``ann_id`` - a list of annotation ids, ``[-1]`` for a no-target expression - ``no_target``,
``image_id``, ``split`` and ``sentences``.  One sample per sentence; the ground truth is the
*set* of referred annotations: ``Targets.boxes`` ``(N, 4)`` (and ``masks`` ``(N, H, W)`` for
``res``) with ``N = 0`` for a no-target expression.  Crowd annotations are left out of the set,
as gRefCOCO's own loader leaves them out of the ground-truth mask.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlzoo.data.coco import (
    SKIP_RECORD_HINT,
    SKIP_SAMPLE_HINT,
    check_box,
    decode_segmentation,
    index_categories,
    index_images,
    load_coco_json,
)
from vlzoo.data.errors import DataError
from vlzoo.data.images import load_image
from vlzoo.data.refcoco import check_reader_args, check_split_present, index_annotations, load_refs
from vlzoo.data.templates import instruction
from vlzoo.structures import Sample, Targets

__all__ = ["GRefCocoDataset", "load_grefs", "NO_TARGET_ANN_ID"]

#: the annotation id a no-target ref lists (``"ann_id": [-1]``)
NO_TARGET_ANN_ID = -1
#: ``grec`` / ``gres`` are the generalized tasks the evaluator scores with gRefCOCO's metrics; ``rec``
#: / ``res`` keep the same samples under the one-referent task names
_TASKS = ("rec", "res", "grec", "gres")


def load_grefs(path: str | Path) -> list[dict]:
    """The refs of a ``grefs(*).json`` (or ``grefs(*).p``) file; :class:`DataError` naming the file
    when it is missing or not a list of refs."""
    path = Path(path)
    if path.suffix == ".p":
        return load_refs(path)
    if not path.is_file():
        raise DataError(f"{path}: grefs file not found; check the recipe's refs_file (gRefCOCO ships grefs(unc).json)")
    try:
        with open(path, encoding="utf-8") as f:
            refs = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON: {e}; the file is damaged or cut short, get it again") from e
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataError(f"{path}: a grefs file holds a list of refs (JSON objects), got {type(refs).__name__}")
    return refs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class GRefCocoDataset(Dataset):
    """gRefCOCO referring expressions with 0, 1 or several referents, one sample per sentence.

    Args:
        refs_file: ``grefs(unc).json`` (or ``grefs(unc).p``).
        instances_file: the ``instances.json`` released with it.
        image_dir: folder with the COCO images (``train2014``).
        split: ``train`` / ``val`` / ``testA`` / ``testB`` (as present in the file).
        tasks: ``rec`` (boxes) and / or ``res`` (also masks); drawn per item from ``(seed, index)``.
        on_bad_sample: ``"error"`` or ``"skip"`` (as :class:`~vlzoo.data.refcoco.RefCocoDataset`).
        seed: picks the task and the instruction phrasing per item.

    ``meta`` holds ``ref_id``, ``sent_id``, ``annotation_ids`` (empty for no-target),
    ``no_target``, ``categories`` (names of the referred objects) and ``file_name``.  Empty
    sentences are skipped, as gRefCOCO's own loader skips them.
    """

    def __init__(
        self,
        *,
        refs_file: str | Path,
        instances_file: str | Path,
        image_dir: str | Path,
        split: str = "val",
        tasks: Sequence[str] = ("res",),
        on_bad_sample: str = "error",
        seed: int = 0,
    ) -> None:
        check_reader_args("GRefCocoDataset", tasks=tasks, allowed=_TASKS, split=split, on_bad_sample=on_bad_sample)
        self.refs_file = Path(refs_file)
        self.instances_file = Path(instances_file)
        self.image_dir = Path(image_dir)
        self.split = split
        self.tasks = list(tasks)
        self.seed = int(seed)
        self.num_skipped = 0
        refs = load_grefs(self.refs_file)
        data = load_coco_json(self.instances_file)
        self.images = index_images(data, self.instances_file)
        self.categories = index_categories(data, self.instances_file)
        self.anns = index_annotations(data, self.instances_file)
        self.image_anns: dict[int, list[int]] = defaultdict(list)
        for a in self.anns.values():
            if _is_int(a.get("image_id")):
                self.image_anns[a["image_id"]].append(a["id"])
        check_split_present(refs, split, self.refs_file)
        self.items: list[tuple[dict, dict, list[int]]] = []
        for ref in refs:
            if ref.get("split") != split:
                continue
            try:
                ann_ids = self._check(ref)
            except DataError:
                if on_bad_sample == "error":
                    raise
                self.num_skipped += 1
                continue
            for sent in ref["sentences"]:
                if sent["sent"].strip():  # gRefCOCO's loader skips empty sentences too
                    self.items.append((ref, sent, ann_ids))
        if not self.items:
            raise DataError(f"{self.refs_file}: no usable {split!r} refs (all {self.num_skipped} were bad records)")

    def _check(self, ref: dict) -> list[int]:
        try:
            return self._check_ref(ref)
        except DataError as err:
            raise DataError(f"{err}; {SKIP_RECORD_HINT}") from None

    def _check_ref(self, ref: dict) -> list[int]:
        """The referred (non-crowd) annotation ids of a valid ref; :class:`DataError` otherwise."""
        where = f"{self.refs_file} ref {ref.get('ref_id', '?')}"
        image_id = ref.get("image_id")
        if not _is_int(image_id):
            raise DataError(f"{where}: field 'image_id' is missing or not an integer (got {image_id!r})")
        if image_id not in self.images:
            raise DataError(f"{where}: image_id {image_id} is not in {self.instances_file} "
                            "(is the grefs file from another dataset?)")
        raw = ref.get("ann_id")
        ann_ids = raw if isinstance(raw, list) else [raw]
        if not ann_ids or not all(_is_int(a) for a in ann_ids):
            raise DataError(f"{where}: 'ann_id' must be an annotation id or a list of them ([-1] for no target), "
                            f"got {raw!r}")
        no_target = ann_ids == [NO_TARGET_ANN_ID]
        if NO_TARGET_ANN_ID in ann_ids and not no_target:
            raise DataError(f"{where}: 'ann_id' {raw!r} mixes -1 (no target) with annotation ids")
        flag = ref.get("no_target", no_target)
        if not isinstance(flag, bool) or flag != no_target:
            raise DataError(f"{where}: 'no_target' is {flag!r} but 'ann_id' is {raw!r} (no target is ann_id [-1] "
                            "with no_target true)")
        sents = ref.get("sentences")
        if not isinstance(sents, list) or not sents or not all(
            isinstance(s, dict) and isinstance(s.get("sent"), str) for s in sents
        ):
            raise DataError(f"{where}: 'sentences' must be a non-empty list of {{'sent': text, ...}}")
        if not any(s["sent"].strip() for s in sents):
            raise DataError(f"{where}: every sentence is empty")
        if no_target:
            return []
        im = self.images[image_id]
        kept = []
        for a in ann_ids:
            ann = self.anns.get(a)
            if ann is None:
                raise DataError(f"{where}: ann_id {a} is not in {self.instances_file} "
                                "(is the grefs file from another dataset?)")
            if ann.get("image_id") != image_id:
                raise DataError(f"{where}: annotation {a} belongs to image {ann.get('image_id')!r}, not {image_id}")
            if not _is_int(ann.get("category_id")) or ann["category_id"] not in self.categories:
                raise DataError(f"{where}: category_id {ann.get('category_id')!r} of annotation {a} is not in "
                                f"{self.instances_file}")
            ann["_xyxy"] = check_box(ann.get("bbox"), int(im["height"]), int(im["width"]), f"{where} annotation {a}")
            if not ann.get("iscrowd", 0):
                kept.append(a)
        if not kept:
            raise DataError(f"{where}: every referred annotation ({ann_ids}) is a crowd region; a target expression "
                            "needs one non-crowd object")
        return kept

    def __len__(self) -> int:
        return len(self.items)

    def _objects(self, ann_ids: list[int], image_id: int, size: tuple[int, int], masks: bool) -> Targets:
        anns = [self.anns[a] for a in ann_ids]
        h, w = size
        t = Targets(
            boxes=torch.tensor([a["_xyxy"] for a in anns], dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.long),
            iscrowd=torch.zeros(len(anns), dtype=torch.bool),
            areas=torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            image_id=image_id,
            image_size=size,
        )
        if masks:
            decoded = [decode_segmentation(a.get("segmentation"), h, w, f"{self.instances_file} annotation {a['id']}")
                       for a in anns]
            t.masks = torch.from_numpy(np.stack(decoded)) if decoded else torch.zeros((0, h, w), dtype=torch.bool)
        return t

    def image_objects(self, index: int, *, masks: bool = True) -> Targets:
        """Every non-crowd object of item ``index``'s image (the "always everything" answer of
        :func:`~vlzoo.evaluation.generalized.generalized_baselines`)."""
        ref, _, _ = self.items[index]
        image_id = int(ref["image_id"])
        info = self.images[image_id]
        size = (int(info["height"]), int(info["width"]))
        ids = []
        for a in self.image_anns.get(image_id, []):
            ann = self.anns[a]
            if ann.get("iscrowd", 0):
                continue
            ann.setdefault("_xyxy", check_box(ann.get("bbox"), size[0], size[1], f"{self.instances_file} annotation {a}"))
            ids.append(a)
        return self._objects(ids, image_id, size, masks)

    def __getitem__(self, index: int) -> Sample:
        ref, sent, ann_ids = self.items[index]
        image_id = int(ref["image_id"])
        info = self.images[image_id]
        image = load_image(self.image_dir / info["file_name"], record=f"ref {ref.get('ref_id')} of {self.refs_file}")
        h, w = int(image.shape[1]), int(image.shape[2])
        if (h, w) != (int(info["height"]), int(info["width"])):
            raise DataError(
                f"{self.image_dir / info['file_name']} (ref {ref.get('ref_id')} of {self.refs_file}): size {w}x{h} "
                f"differs from the annotation's {info['width']}x{info['height']}; {SKIP_SAMPLE_HINT}"
            )
        rng = np.random.default_rng([self.seed, index])
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        expr = str(sent["sent"]).strip()
        targets = self._objects(ann_ids, image_id, (h, w), masks=task in ("res", "gres")).replace(expressions=[expr])
        meta: dict[str, Any] = {
            "ref_id": ref.get("ref_id"),
            "sent_id": sent.get("sent_id"),
            "annotation_ids": list(ann_ids),
            "no_target": not ann_ids,
            "categories": [self.categories[int(self.anns[a]["category_id"])]["name"] for a in ann_ids],
            "file_name": info["file_name"],
        }
        return Sample(image, task, instruction(task, rng, expr=expr), targets, image_id=image_id, meta=meta)
