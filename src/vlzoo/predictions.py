"""Writing predictions: COCO-style result records and the ``vlzoo predict`` writer.

One record per predicted instance, as COCO's result format: ``image_id``, ``category_id``,
``bbox`` (``xywh``, original pixels), ``score``, plus ``segmentation`` (COCO RLE with a text
``counts``) and ``keypoints`` (flat ``[x, y, v, ...]``) when predicted, ``task`` and ``text``
when known.  A sample without instances but with text (captions, REG, VQA or an unparsed
answer) gets one record with ``image_id``, ``task``, ``text`` and ``parsed``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from pycocotools import mask as mask_utils

from vlzoo.config import RecipeError
from vlzoo.structures import Batch, Predictions
from vlzoo.visualize import draw_overlay

__all__ = ["encode_rle", "predictions_to_coco", "PredictionWriter"]


def encode_rle(mask: Any) -> dict[str, Any]:
    """A boolean (H, W) mask as COCO RLE with ``counts`` as text (JSON-serialisable)."""
    array = np.asfortranarray(np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, dtype=np.uint8))
    rle = mask_utils.encode(array)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def predictions_to_coco(pred: Predictions, *, task: str | None = None) -> list[dict[str, Any]]:
    """COCO-style result records of one sample's predictions (original pixels)."""
    n_masks = 0 if pred.masks is None else int(pred.masks.shape[0])
    n_kps = 0 if pred.keypoints is None else int(pred.keypoints.shape[0])
    n = max(len(pred), n_masks, n_kps)
    records: list[dict[str, Any]] = []
    for i in range(n):
        record: dict[str, Any] = {"image_id": int(pred.image_id)}
        record["category_id"] = int(pred.labels[i]) if i < len(pred.labels) else 0
        rle = encode_rle(pred.masks[i]) if i < n_masks else None
        if i < len(pred):
            x1, y1, x2, y2 = (float(v) for v in pred.boxes[i].tolist())
            record["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        elif rle is not None:
            record["bbox"] = [float(v) for v in mask_utils.toBbox({**rle, "counts": rle["counts"].encode()})]
        if pred.mask_scores is not None and i < len(pred.mask_scores) and i >= len(pred.scores):
            record["score"] = float(pred.mask_scores[i])
        else:
            record["score"] = float(pred.scores[i]) if i < len(pred.scores) else 1.0
        if rle is not None:
            record["segmentation"] = rle
        if i < n_kps:
            record["keypoints"] = [float(v) for v in pred.keypoints[i].reshape(-1).tolist()]
        if task is not None:
            record["task"] = task
        if pred.text is not None:
            record["text"] = pred.text
        records.append(record)
    if n == 0 and (pred.text is not None or not pred.parsed):
        record = {"image_id": int(pred.image_id), "text": pred.text, "parsed": bool(pred.parsed)}
        if task is not None:
            record["task"] = task
        records.append(record)
    elif not pred.parsed:
        for record in records:
            record["parsed"] = False
    return records


class PredictionWriter(Callback):
    """Collects what ``predict_step`` returns (``list[Predictions]``, one per sample, original
    pixels), writes the COCO-style records to ``output`` at the end and, with ``overlays``, one
    PNG per sample (``<image_id>-<index>.png``) with ground truth and prediction drawn on the raw
    image (the batch must carry ``raw_images``)."""

    def __init__(self, output: str | Path, *, overlays: str | Path | None = None, max_overlays: int | None = None) -> None:
        self.output = Path(output)
        self.overlays = None if overlays is None else Path(overlays)
        self.max_overlays = max_overlays
        self.records: list[dict[str, Any]] = []
        self.overlay_paths: list[Path] = []
        self._count = 0

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, list) or not all(isinstance(p, Predictions) for p in outputs):
            raise RecipeError(
                f"{type(pl_module).__name__}.predict_step must return list[Predictions] (one per sample), "
                f"got {type(outputs).__name__}"
            )
        tasks = getattr(batch, "tasks", None) or [None] * len(outputs)
        for i, pred in enumerate(outputs):
            self.records.extend(predictions_to_coco(pred, task=tasks[i]))
            if self.overlays is not None and (self.max_overlays is None or len(self.overlay_paths) < self.max_overlays):
                self._overlay(batch, i, pred)
            self._count += 1

    def _overlay(self, batch: Batch, i: int, pred: Predictions) -> None:
        if getattr(batch, "raw_images", None) is None:
            raise RecipeError(
                "predict --overlays needs the raw images, but the batches carry none (Batch.raw_images is None); "
                "the datamodule needs a keep_raw_images parameter or attribute"
            )
        target = batch.original_targets[i] if batch.original_targets else None
        title = batch.tasks[i] + ": " + batch.prompts[i] if batch.prompts else batch.tasks[i]
        if pred.text:
            title += f"\n-> {pred.text}"
        path = self.overlays / f"{pred.image_id}-{self._count}.png"
        transform = batch.transforms[i] if batch.transforms else None
        self.overlay_paths.append(draw_overlay(batch.raw_images[i], target, pred, path, title[:200], transform=transform))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        # written beside the target, then renamed into place: never a half-written result file
        tmp = self.output.with_name(f".{self.output.name}.tmp")
        tmp.write_text(json.dumps(self.records))
        tmp.replace(self.output)
