"""Writing predictions: vlzoo's record file, COCO result files and the ``vlzoo predict`` writer.

:func:`predictions_to_coco` gives one record per predicted instance with everything predicted:
``image_id``, ``category_id``, ``bbox`` (``xywh``, original pixels), ``score``, plus
``segmentation`` (COCO RLE with a text ``counts``) and ``keypoints`` (flat ``[x, y, v, ...]``)
when predicted, ``task`` and ``text`` when known.  A sample without instances but with text
(captions, REG, VQA or an unparsed answer) gets one record with ``image_id``, ``task``, ``text``
and ``parsed``.  :class:`PredictionWriter` adds the sample's ``sent_id`` / ``ref_id`` (RefCOCO) to
each record, so ``vlzoo score`` reads its output back.

:func:`coco_results` gives the records of one COCO ``iou_type`` in COCO's result format (a
``bbox`` file, a ``segm`` file without ``bbox``, a ``keypoints`` file without ``bbox``):
pycocotools' ``loadRes`` + ``COCOeval`` on such a file reproduce vlzoo's in-process figures
(docs/evaluation.md, "Area ranges").  ``loadRes`` picks its rule for ``area`` from the keys of
the *first* record, so the mixed record file above, whose records all carry ``bbox``, would be
bucketed by box area for segm and keypoints too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from pycocotools import mask as mask_utils

from vlzoo.config import RecipeError
from vlzoo.evaluation.common import check_finite
from vlzoo.evaluation.detection import encode_masks
from vlzoo.structures import Batch, Predictions
from vlzoo.visualize import draw_overlay

__all__ = ["encode_rle", "predictions_to_coco", "coco_results", "COCO_RESULT_TYPES", "TASK_RESULT_TYPE",
           "PredictionWriter", "SAMPLE_ID_KEYS"]

#: Sample ids a dataset's ``meta`` may carry that every record of the sample repeats (RefCOCO's).
SAMPLE_ID_KEYS = ("sent_id", "ref_id")
#: The COCO ``iou_type`` s a result file can hold.
COCO_RESULT_TYPES = ("bbox", "segm", "keypoints")
#: The COCO result file each vlzoo task's predictions go to (``vlzoo predict``).
TASK_RESULT_TYPE = {"det": "bbox", "seg": "segm", "pose": "keypoints"}


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


def coco_results(pred: Predictions, iou_type: str, *, category_id: int | None = None) -> list[dict[str, Any]]:
    """One sample's records in COCO's result format for ``iou_type`` (original pixels).

    * ``bbox``: ``image_id``, ``category_id``, ``bbox`` (``xywh``), ``score`` for each predicted box;
      a box with a NaN/inf coordinate is written as ``[0, 0, 0, 0]`` (a false positive, as
      :class:`~vlzoo.evaluation.DetectionMAP` scores it).
    * ``segm``: ``segmentation`` (RLE, text ``counts``) instead of ``bbox``, so that ``loadRes``
      takes the mask area; scores are ``scores``, else ``mask_scores``.
    * ``keypoints``: flat ``keypoints`` instead of ``bbox``, so that ``loadRes`` takes the extent of
      the keypoints.

    Scores default to 1.0 when none are predicted; an unlabeled prediction gets ``category_id``
    (:class:`PredictionWriter` passes the category the sample's query names, ``Batch.category_ids``
    - never one read from the targets - and leaves a sample out of the result files, with a
    warning, when there is none).  ``parsed=False`` gives no records, as in-process metrics count no detections.
    Counts that disagree, non-finite scores or an unlabeled prediction without ``category_id``
    raise ``ValueError`` naming the ``image_id``.
    """
    if iou_type not in COCO_RESULT_TYPES:
        raise ValueError(f"coco_results: iou_type must be one of {COCO_RESULT_TYPES}, got {iou_type!r}")
    if not pred.parsed:
        return []
    image_id = int(pred.image_id)
    scores = pred.scores
    if iou_type == "bbox":
        boxes = pred.boxes.detach().cpu().double().reshape(-1, 4)
        n = boxes.shape[0]
    elif iou_type == "segm":
        n = 0 if pred.masks is None else int(pred.masks.shape[0])
        if not scores.numel() and pred.mask_scores is not None:
            scores = pred.mask_scores
    else:
        n = 0 if pred.keypoints is None else int(pred.keypoints.shape[0])
    if n == 0:
        return []
    scores = scores.detach().cpu().double().reshape(-1)
    if scores.numel() == 0:
        scores = torch.ones(n, dtype=torch.float64)
    if scores.numel() != n:
        raise ValueError(f"coco_results({iou_type}): prediction of image_id={image_id} has {n} instances but "
                         f"{scores.numel()} scores")
    check_finite(scores, what="predicted scores", image_id=image_id, metric=f"coco_results({iou_type})")
    labels = pred.labels.detach().cpu().reshape(-1).tolist()
    if not labels:
        if category_id is None:
            raise ValueError(f"coco_results({iou_type}): prediction of image_id={image_id} has no labels; fill "
                             f"Predictions.labels or pass category_id")
        labels = [int(category_id)] * n
    if len(labels) != n:
        raise ValueError(f"coco_results({iou_type}): prediction of image_id={image_id} has {n} instances but "
                         f"{len(labels)} labels")
    head = [{"image_id": image_id, "category_id": int(c), "score": s} for c, s in zip(labels, scores.tolist(), strict=True)]
    if iou_type == "bbox":
        boxes = torch.where(torch.isfinite(boxes).all(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for record, box in zip(head, xywh, strict=True):
            record["bbox"] = box
    elif iou_type == "segm":
        masks = pred.masks if pred.masks.dtype == torch.bool else pred.masks > 0.5
        for record, rle in zip(head, encode_masks(masks), strict=True):
            record["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    else:
        check_finite(pred.keypoints, what="predicted keypoints", image_id=image_id, metric="coco_results(keypoints)")
        flat = pred.keypoints.detach().cpu().double().reshape(n, -1).tolist()
        for record, kp in zip(head, flat, strict=True):
            record["keypoints"] = kp
    return head


class PredictionWriter(Callback):
    """Collects what ``predict_step`` returns (``list[Predictions]``, one per sample, original
    pixels), writes the records of :func:`predictions_to_coco` to ``output`` at the end and,
    beside it, a COCO result file ``<stem>.<iou_type>.json`` per COCO type predicted
    (:func:`coco_results`: ``det`` samples -> ``bbox``, ``seg`` -> ``segm``, ``pose`` ->
    ``keypoints``; a sample of unknown task goes to every type it has outputs for).  With
    ``overlays``, one PNG per sample (``<image_id>-<index>.png``) with ground truth and prediction
    drawn on the raw image (the batch must carry ``raw_images``)."""

    def __init__(self, output: str | Path, *, overlays: str | Path | None = None, max_overlays: int | None = None) -> None:
        self.output = Path(output)
        self.overlays = None if overlays is None else Path(overlays)
        self.max_overlays = max_overlays
        self.records: list[dict[str, Any]] = []
        self.results: dict[str, list[dict[str, Any]]] = {t: [] for t in COCO_RESULT_TYPES}
        self.unlabeled = 0
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
        categories = getattr(batch, "category_ids", None) or [None] * len(outputs)
        metas = getattr(batch, "meta", None) or [{}] * len(outputs)
        for i, pred in enumerate(outputs):
            # the dataset's sentence / ref ids (RefCOCO), so `vlzoo score` can match the records
            ids = {k: metas[i][k] for k in SAMPLE_ID_KEYS if metas[i].get(k) is not None}
            self.records.extend({**record, **ids} for record in predictions_to_coco(pred, task=tasks[i]))
            category = categories[i]
            types = self._result_types(tasks[i], pred)
            if types and pred.labels.numel() == 0 and category is None:
                self.unlabeled += 1  # no category to write: left out of the COCO result files
                continue
            for iou_type in types:
                self.results[iou_type].extend(coco_results(pred, iou_type, category_id=category))
            if self.overlays is not None and (self.max_overlays is None or len(self.overlay_paths) < self.max_overlays):
                self._overlay(batch, i, pred)
            self._count += 1

    @staticmethod
    def _result_types(task: str | None, pred: Predictions) -> list[str]:
        if task is not None:
            return [TASK_RESULT_TYPE[task]] if task in TASK_RESULT_TYPE else []
        have = {"bbox": len(pred) > 0, "segm": pred.masks is not None and pred.masks.shape[0] > 0,
                "keypoints": pred.keypoints is not None and pred.keypoints.shape[0] > 0}
        return [t for t in COCO_RESULT_TYPES if have[t]]

    def result_paths(self) -> dict[str, Path]:
        """Where the COCO result file of each type goes (``<stem>.<iou_type>.json`` beside ``output``)."""
        return {t: self.output.with_name(f"{self.output.stem}.{t}.json") for t in COCO_RESULT_TYPES}

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
        _write_json(self.output, self.records)
        for iou_type, path in self.result_paths().items():
            if self.results[iou_type]:
                _write_json(path, self.results[iou_type])
        if self.unlabeled:
            rank_zero_warn(
                f"{self.unlabeled} sample(s) predicted instances without labels and their query names no category "
                f"(Batch.category_ids): they are in {self.output.name} but not in the COCO result files "
                f"(fill Predictions.labels to score them with pycocotools)"
            )


def _write_json(path: Path, data: Any) -> None:
    """Write beside the target, then rename into place: never a half-written result file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
