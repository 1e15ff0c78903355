"""COCO detection / instance-segmentation mAP, fed from :class:`Predictions` / :class:`Targets` and
scored by faster_coco_eval's ``COCOeval``.

``update`` turns each batch into a few arrays (boxes ``xywh``, areas, labels, scores; masks as COCO
RLE, encoded once per sample) and ``compute`` builds the COCO datasets from them in one pass, so
almost all of the time is the backend's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torchmetrics import Metric

from vlzoo.evaluation.cocoeval import coco_summary, paused_gc
from vlzoo.evaluation.common import ObjectListSync, check_finite, check_pairs
from vlzoo.structures import Predictions, Targets

__all__ = ["DetectionMAP", "COCO_MAP_KEYS", "encode_masks"]

#: The scalar figures reported (COCO's 12 summary numbers).
COCO_MAP_KEYS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip

# columns of the per-batch state rows
_GT_COLUMNS = ("image", "x", "y", "w", "h", "area", "label", "crowd")
_DT_COLUMNS = ("image", "x", "y", "w", "h", "area", "label", "score")


def encode_masks(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """COCO RLE (``counts`` as bytes) of boolean ``(N, H, W)`` masks, in one pycocotools call."""
    array = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if array.shape[0] == 0:
        return []
    # pycocotools wants (H, W, N) in Fortran order: one copy of the whole stack
    as_bytes = array.view(np.uint8) if array.dtype == np.bool_ else array.astype(np.uint8)
    stacked = np.asfortranarray(as_bytes.transpose(1, 2, 0))
    return mask_utils.encode(stacked)


class DetectionMAP(ObjectListSync, Metric):
    """COCO mAP / mAR for boxes (``iou_type="bbox"``) or instance masks (``iou_type="segm"``).

    Every sample is one COCO "image" (a ``(image, category prompt)`` pair when a dataset asks for
    one category per sample), so a sample without ground truth still counts its detections as false
    positives.  Inputs, per sample:

    * targets: ``boxes`` (bbox) or ``masks`` (segm), ``labels`` (one per instance), optional
      ``iscrowd`` (crowd regions are matched as COCO does and never count as misses) and
      ``areas`` (COCO "area"; used when positive, else the box area for bbox and the mask area
      for segm);
    * predictions: ``boxes`` (bbox) or ``masks`` (segm), ``scores`` (``mask_scores`` are used for
      segm when ``scores`` is empty; detections without any score all get 1.0 and are ranked in
      output order), ``labels`` (required: one per detection; never taken from the targets).

    The area that puts a *detection* into the small / medium / large ranges is the one
    pycocotools' ``loadRes`` computes from COCO's result format: the box area for bbox, the mask
    area for segm (docs/evaluation.md, "Area ranges").

    A prediction with ``parsed=False`` contributes no detections (its objects are misses).  A
    predicted box with a NaN/inf coordinate becomes the empty box ``[0, 0, 0, 0]``: a false positive
    at its score.  Non-finite scores or target boxes, label counts that do not match, unlabeled
    detections, and masks whose size differs from
    the target's raise ``ValueError`` naming the ``image_id``.  ``compute`` returns the keys of
    :data:`COCO_MAP_KEYS`; -1 marks a figure COCO leaves undefined (e.g. no ground truth at all).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        *,
        iou_type: Literal["bbox", "segm"] = "bbox",
        max_detection_thresholds: Sequence[int] = (1, 10, 100),
    ) -> None:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        dets = [int(d) for d in max_detection_thresholds]
        if len(dets) != 3 or any(d < 1 for d in dets) or dets != sorted(dets):
            raise ValueError(f"max_detection_thresholds must be 3 increasing positive integers, got {dets}")
        super().__init__()
        self.iou_type = iou_type
        self.max_detection_thresholds = dets
        # pycocotools' own float64 thresholds (a float32 linspace moves recalls such as 3/10 across
        # a threshold and shifts AP)
        self.iou_thresholds = np.linspace(0.5, 0.95, 10, endpoint=True).tolist()
        self.rec_thresholds = np.linspace(0.0, 1.00, 101, endpoint=True).tolist()
        self.report_keys = (
            "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
            f"mar_{dets[0]}", f"mar_{dets[1]}", f"mar_{dets[2]}", "mar_small", "mar_medium", "mar_large",
        )  # fmt: skip
        # one entry per update() call: float64 rows (columns _GT_COLUMNS / _DT_COLUMNS, "image"
        # counted within the call), the number of samples, and for segm the RLEs of the rows
        self.add_state("gt_rows", default=[], dist_reduce_fx=None)
        self.add_state("dt_rows", default=[], dist_reduce_fx=None)
        self.add_state("num_samples", default=[], dist_reduce_fx=None)
        self.add_state("image_sizes", default=[], dist_reduce_fx=None)
        self.add_state("gt_rles", default=[], dist_reduce_fx=None)
        self.add_state("dt_rles", default=[], dist_reduce_fx=None)

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        # RLE lists are not tensors: device / dtype moves leave them alone
        return super()._apply(fn, exclude_state=(*exclude_state, "gt_rles", "dt_rles"))

    # --- conversion -------------------------------------------------------------------------
    def _masks(self, masks: Tensor | None, size: tuple[int, int] | None, image_id: int, who: str) -> Tensor:
        if masks is None:
            raise ValueError(f"DetectionMAP(segm): {who} of image_id={image_id} have no masks")
        if masks.dim() != 3 or (size is not None and tuple(masks.shape[-2:]) != size):
            raise ValueError(
                f"DetectionMAP(segm): {who} masks of image_id={image_id} have shape {tuple(masks.shape)}, "
                f"expected (N, {size[0] if size else 'H'}, {size[1] if size else 'W'})"
            )
        return (masks if masks.dtype == torch.bool else masks > 0.5).detach().cpu()

    def _target(self, t: Targets) -> tuple[np.ndarray, list[dict[str, Any]], tuple[int, int] | None]:
        """Rows ``(n, 8)`` (image column left 0), RLEs (segm) and the mask size of one target."""
        segm = self.iou_type == "segm"
        check_finite(t.boxes, what="target boxes", image_id=t.image_id, metric="DetectionMAP")
        size: tuple[int, int] | None = tuple(t.image_size) if tuple(t.image_size) != (0, 0) else None
        rles: list[dict[str, Any]] = []
        if segm:
            masks = self._masks(t.masks, size, t.image_id, "targets")
            size = tuple(masks.shape[-2:])
            n = masks.shape[0]
            rles = encode_masks(masks)
        else:
            boxes = t.boxes.detach().cpu().double().reshape(-1, 4).numpy()
            n = boxes.shape[0]
        labels = t.labels.detach().cpu().reshape(-1).numpy()
        if labels.size != n:
            raise ValueError(f"DetectionMAP: target of image_id={t.image_id} has {n} instances but "
                             f"{labels.size} labels")
        rows = np.zeros((n, len(_GT_COLUMNS)), dtype=np.float64)
        if segm:
            rows[:, 1:5] = mask_utils.toBbox(rles) if n else np.zeros((0, 4))
            rows[:, 5] = mask_utils.area(rles) if n else np.zeros(0)
        else:
            rows[:, 1:3] = boxes[:, :2]
            rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]
            rows[:, 5] = rows[:, 3] * rows[:, 4]
        rows[:, 6] = labels
        if t.iscrowd is not None:
            if t.iscrowd.numel() != n:
                raise ValueError(f"DetectionMAP: target of image_id={t.image_id} has {n} instances but "
                                 f"{t.iscrowd.numel()} iscrowd flags")
            rows[:, 7] = t.iscrowd.detach().cpu().reshape(-1).numpy()
        if t.areas is not None:
            if t.areas.numel() != n:
                raise ValueError(f"DetectionMAP: target of image_id={t.image_id} has {n} instances but "
                                 f"{t.areas.numel()} areas")
            check_finite(t.areas, what="target areas", image_id=t.image_id, metric="DetectionMAP")
            given = t.areas.detach().cpu().double().reshape(-1).numpy()
            rows[:, 5] = np.where(given > 0, given, rows[:, 5])
        return rows, rles, size

    def _prediction(self, p: Predictions, t: Targets, size: tuple[int, int] | None
                    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Rows ``(m, 8)`` (image column left 0) and RLEs (segm) of one prediction."""
        segm = self.iou_type == "segm"
        empty = np.zeros((0, len(_DT_COLUMNS)), dtype=np.float64)
        if not p.parsed:
            return empty, []
        if segm:
            if p.masks is None or p.masks.shape[0] == 0:
                return empty, []
            masks = self._masks(p.masks, size, t.image_id, "predictions")
            n = masks.shape[0]
            scores = p.scores if p.scores.numel() or p.mask_scores is None else p.mask_scores
        else:
            boxes = p.boxes.detach().cpu().double().reshape(-1, 4).numpy()
            n = boxes.shape[0]
            scores = p.scores
        if n == 0:
            return empty, []
        scores = scores.detach().cpu().double().reshape(-1)
        if scores.numel() == 0:
            scores = torch.ones(n, dtype=torch.float64)
        if scores.numel() != n:
            raise ValueError(f"DetectionMAP: prediction of image_id={t.image_id} has {n} detections but "
                             f"{scores.numel()} scores")
        check_finite(scores, what="predicted scores", image_id=t.image_id, metric="DetectionMAP")
        labels = p.labels.detach().cpu().long().reshape(-1)
        if labels.numel() == 0:
            raise ValueError(
                f"DetectionMAP: prediction of image_id={t.image_id} has {n} detections but no labels; the paradigm "
                "must label them (with the category its query names, Batch.category_ids) - the metric never takes "
                "labels from the ground truth"
            )
        if labels.numel() != n:
            raise ValueError(f"DetectionMAP: prediction of image_id={t.image_id} has {n} detections but "
                             f"{labels.numel()} labels")
        rows = np.zeros((n, len(_DT_COLUMNS)), dtype=np.float64)
        rles: list[dict[str, Any]] = []
        if segm:
            rles = encode_masks(masks)
            rows[:, 1:5] = mask_utils.toBbox(rles)
            rows[:, 5] = mask_utils.area(rles)
        else:
            boxes = np.where(np.isfinite(boxes).all(axis=1, keepdims=True), boxes, 0.0)
            rows[:, 1:3] = boxes[:, :2]
            rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]
            rows[:, 5] = rows[:, 3] * rows[:, 4]
        rows[:, 6] = labels.numpy()
        rows[:, 7] = scores.numpy()
        return rows, rles

    def update(self, preds: list[Predictions], targets: list[Targets]) -> None:  # type: ignore[override]
        """Accumulate one batch of samples (original-image pixels)."""
        check_pairs(preds, targets, metric="DetectionMAP")
        gt_parts, dt_parts, gt_rles, dt_rles, sizes = [], [], [], [], []
        for index, (p, t) in enumerate(zip(preds, targets, strict=True)):
            rows, rles, size = self._target(t)
            sizes.append(size or (0, 0))
            rows[:, 0] = index
            gt_parts.append(rows)
            gt_rles.extend(rles)
            rows, rles = self._prediction(p, t, size)
            rows[:, 0] = index
            dt_parts.append(rows)
            dt_rles.extend(rles)
        self.gt_rows.append(torch.from_numpy(np.concatenate(gt_parts) if gt_parts else np.zeros((0, 8))))
        self.dt_rows.append(torch.from_numpy(np.concatenate(dt_parts) if dt_parts else np.zeros((0, 8))))
        self.num_samples.append(torch.tensor([len(preds)]))
        self.image_sizes.append(torch.tensor(sizes, dtype=torch.long).reshape(-1, 2))
        if self.iou_type == "segm":
            self.gt_rles.append(gt_rles)
            self.dt_rles.append(dt_rles)

    # --- evaluation -------------------------------------------------------------------------
    def _gathered(self, name: str) -> np.ndarray:
        """All rows of a state with the "image" column numbered over the whole split."""
        offsets = np.cumsum([0] + [int(n) for n in self.num_samples])
        parts = []
        for offset, rows in zip(offsets, getattr(self, name), strict=False):
            rows = rows.detach().cpu().numpy().copy()
            rows[:, 0] += offset
            parts.append(rows)
        return np.concatenate(parts) if parts else np.zeros((0, 8))

    def coco_datasets(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ground-truth and result COCO datasets of the accumulated state (sample ``i`` is image
        ``i``; result ``area`` as documented)."""
        segm = self.iou_type == "segm"
        gt, dt = self._gathered("gt_rows"), self._gathered("dt_rows")
        sizes = torch.cat(self.image_sizes).tolist() if self.image_sizes else []
        images = [{"id": i, "height": h, "width": w} if h else {"id": i} for i, (h, w) in enumerate(sizes)]
        categories = [{"id": c, "name": str(c)} for c in np.unique(np.concatenate([gt[:, 6], dt[:, 6]])).astype(int).tolist()]
        gt_rles = [r for part in self.gt_rles for r in part] if segm else None
        dt_rles = [r for part in self.dt_rles for r in part] if segm else None
        gt_anns = [
            {"id": k, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": z}
            for k, (i, c, b, a, z) in enumerate(zip(
                gt[:, 0].astype(int).tolist(), gt[:, 6].astype(int).tolist(), gt[:, 1:5].tolist(),
                gt[:, 5].tolist(), gt[:, 7].astype(int).tolist(), strict=True), start=1)
        ]
        dt_anns = [
            {"id": k, "image_id": i, "category_id": c, "bbox": b, "area": a, "score": s, "iscrowd": 0}
            for k, (i, c, b, a, s) in enumerate(zip(
                dt[:, 0].astype(int).tolist(), dt[:, 6].astype(int).tolist(), dt[:, 1:5].tolist(),
                dt[:, 5].tolist(), dt[:, 7].tolist(), strict=True), start=1)
        ]
        if segm:
            for ann, rle in zip(gt_anns, gt_rles, strict=True):
                ann["segmentation"] = rle
            for ann, rle in zip(dt_anns, dt_rles, strict=True):
                ann["segmentation"] = rle
        return (
            {"images": images, "annotations": gt_anns, "categories": categories},
            {"images": images, "annotations": dt_anns, "categories": categories},
        )

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """The 12 COCO summary figures as float32 scalars (keys of :attr:`report_keys`)."""
        undefined = {k: torch.tensor(-1.0) for k in self.report_keys}
        if not self.num_samples or not any(rows.shape[0] for rows in self.gt_rows):
            return undefined
        with paused_gc():
            gt, dt = self.coco_datasets()
            stats = coco_summary(
                gt, dt, iou_type=self.iou_type, count=len(self.report_keys), iou_thresholds=self.iou_thresholds,
                rec_thresholds=self.rec_thresholds, max_dets=self.max_detection_thresholds,
            )
        return {k: torch.tensor(float(v), dtype=torch.float32) for k, v in zip(self.report_keys, stats, strict=True)}
