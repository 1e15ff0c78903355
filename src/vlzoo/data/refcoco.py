"""RefCOCO / RefCOCO+ / RefCOCOg in the REFER release format.

A release folder holds ``refs(unc).p`` (or ``refs(umd).p``, ``refs(google).p``) and
``instances.json``.  One sample per sentence; ``rec`` targets the referred box, ``res`` also its
mask, ``reg`` asks for the expression of the box.  The pickle is read by a restricted unpickler
that admits only plain containers, numbers and strings - a refs file cannot run code.
"""

from __future__ import annotations

import io
import pickle
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
from vlzoo.data.templates import instruction
from vlzoo.structures import Sample, Targets

__all__ = ["RefCocoDataset", "load_refs", "REFER_SPLITS"]

REFER_SPLITS = ("train", "val", "test", "testA", "testB")
_REF_TASKS = ("rec", "res", "reg")
_SAFE_GLOBALS = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple")}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a refs file")



def check_reader_args(name: str, *, tasks: Sequence[str], allowed: Sequence[str], split: str, on_bad_sample: str) -> None:
    """The argument checks every REFER-format reader makes (RefCOCO, gRefCOCO)."""
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"{name}: on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    bad = [t for t in tasks if t not in allowed]
    if bad or not tasks:
        raise ValueError(f"{name}: tasks {bad} not supported; choose from {tuple(allowed)}")
    if split not in REFER_SPLITS:
        raise ValueError(f"{name}: split must be one of {REFER_SPLITS}, got {split!r}")


def index_annotations(data: dict, instances_file: Path) -> dict[int, dict]:
    """``{id: annotation}`` of an ``instances.json``; an annotation without an integer id is an error."""
    anns: dict[int, dict] = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or isinstance(a.get("id"), bool) or not isinstance(a.get("id"), int):
            raise DataError(f"{instances_file} annotations[{i}]: field 'id' is missing or not an integer")
        anns[a["id"]] = a
    return anns


def check_split_present(refs: Sequence[dict], split: str, refs_file: Path) -> None:
    """A refs file must hold refs of the split asked for."""
    present = sorted({str(r.get("split")) for r in refs})
    if split not in present:
        raise DataError(f"{refs_file}: no refs of split {split!r}; the file has splits {present}")


def load_refs(path: str | Path) -> list[dict]:
    """Read a REFER refs pickle with only plain data admitted; :class:`DataError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: refs file not found; check the recipe's refs_file (and the REFCOCO_ROOT folder it may be "
            "read from)"
        )
    try:
        refs = _PlainUnpickler(io.BytesIO(path.read_bytes()), encoding="utf-8", errors="replace").load()
    except Exception as e:  # any unpickling failure is a bad file, whatever the exception type
        raise DataError(f"{path}: not a readable REFER refs pickle ({e}); the file is damaged or of another kind") from e
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataError(f"{path}: a refs file holds a list of dicts, got {type(refs).__name__}")
    return refs


class RefCocoDataset(Dataset):
    """RefCOCO-family referring expressions, one sample per sentence.

    Args:
        refs_file: ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p``.
        instances_file: the ``instances.json`` released with it.
        image_dir: folder with the COCO images (``train2014``).
        split: ``train`` / ``val`` / ``test`` / ``testA`` / ``testB`` (as present in the file).
        tasks: any of ``rec``, ``res``, ``reg``; the task of a sentence is drawn from
            ``(seed, index)``.
        on_bad_sample: ``"error"`` or ``"skip"`` (see :class:`~vlzoo.data.coco.CocoDataset`).
        seed: picks the task and instruction phrasing per item (injected).
    """

    def __init__(
        self,
        *,
        refs_file: str | Path,
        instances_file: str | Path,
        image_dir: str | Path,
        split: str = "val",
        tasks: Sequence[str] = ("rec",),
        on_bad_sample: str = "error",
        seed: int = 0,
    ) -> None:
        check_reader_args("RefCocoDataset", tasks=tasks, allowed=_REF_TASKS, split=split, on_bad_sample=on_bad_sample)
        self.refs_file = Path(refs_file)
        self.instances_file = Path(instances_file)
        self.image_dir = Path(image_dir)
        self.split = split
        self.tasks = list(tasks)
        self.seed = int(seed)
        self.num_skipped = 0
        refs = load_refs(self.refs_file)
        data = load_coco_json(self.instances_file)
        self.images = index_images(data, self.instances_file)
        self.categories = index_categories(data, self.instances_file)
        self.anns = index_annotations(data, self.instances_file)
        check_split_present(refs, split, self.refs_file)
        self.items: list[tuple[dict, dict]] = []
        matched = 0
        for ref in refs:
            if ref.get("split") != split:
                continue
            try:
                self._check(ref)
            except DataError:
                if on_bad_sample == "error":
                    raise
                self.num_skipped += 1
                continue
            matched += 1
            for sent in ref["sentences"]:
                self.items.append((ref, sent))
        if matched == 0:
            raise DataError(
                f"{self.refs_file}: none of the {split!r} refs match {self.instances_file} "
                "(is the refs file from another dataset?)"
            )

    def _check(self, ref: dict) -> None:
        try:
            self._check_ref(ref)
        except DataError as err:
            raise DataError(f"{err}; {SKIP_RECORD_HINT}") from None

    def _check_ref(self, ref: dict) -> None:
        where = f"{self.refs_file} ref {ref.get('ref_id', '?')}"
        for field in ("ann_id", "image_id"):
            if isinstance(ref.get(field), bool) or not isinstance(ref.get(field), int):
                raise DataError(f"{where}: field '{field}' is missing or not an integer (got {ref.get(field)!r})")
        ann = self.anns.get(ref["ann_id"])
        if ann is None:
            raise DataError(
                f"{where}: ann_id {ref.get('ann_id')} is not in {self.instances_file} "
                "(is the refs file from another dataset?)"
            )
        image_id = ann.get("image_id")
        if ref["image_id"] != image_id or not isinstance(image_id, int) or image_id not in self.images:
            raise DataError(f"{where}: image_id {ref.get('image_id')} does not match annotation {ann['id']}")
        if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in self.categories:
            raise DataError(f"{where}: category_id {ann.get('category_id')} is not in {self.instances_file}")
        sents = ref.get("sentences")
        if not isinstance(sents, list) or not sents or not all(isinstance(s, dict) and "sent" in s for s in sents):
            raise DataError(f"{where}: 'sentences' must be a non-empty list of {{'sent': ...}}")
        im = self.images[int(ann["image_id"])]
        ann["_xyxy"] = check_box(ann.get("bbox"), int(im["height"]), int(im["width"]), f"{where} annotation {ann['id']}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        ref, sent = self.items[index]
        ann = self.anns[int(ref["ann_id"])]
        info = self.images[int(ann["image_id"])]
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
        targets = Targets(
            boxes=torch.tensor([ann["_xyxy"]], dtype=torch.float32),
            labels=torch.tensor([int(ann["category_id"])], dtype=torch.long),
            iscrowd=torch.zeros(1, dtype=torch.bool),
            areas=torch.tensor([float(ann.get("area", 0.0))], dtype=torch.float32),
            expressions=[expr],
            image_id=int(ann["image_id"]),
            image_size=(h, w),
        )
        meta: dict[str, Any] = {
            "ref_id": ref.get("ref_id"),
            "sent_id": sent.get("sent_id"),
            "annotation_ids": [int(ann["id"])],
            "file_name": info["file_name"],
        }
        if task == "res":
            where = f"{self.instances_file} annotation {ann['id']} (ref {ref.get('ref_id')})"
            targets.masks = torch.from_numpy(decode_segmentation(ann.get("segmentation"), h, w, where)[None])
        if task == "reg":
            targets = targets.replace(captions=[expr], text=expr)
            return Sample(
                image, task, instruction("reg", rng), targets, answer=expr, image_id=targets.image_id,
                prompt_boxes=torch.tensor([list(ann["_xyxy"])], dtype=torch.float32), meta=meta,
            )
        return Sample(image, task, instruction(task, rng, expr=expr), targets, image_id=targets.image_id, meta=meta)
