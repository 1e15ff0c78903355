"""COCO detection / instance-segmentation mAP through torchmetrics' ``MeanAveragePrecision`` with the
``faster_coco_eval`` backend, fed from :class:`Predictions` / :class:`Targets`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import masks_to_boxes

from vlzoo.evaluation.common import ObjectListSync, check_finite, check_pairs
from vlzoo.structures import Predictions, Targets

__all__ = ["DetectionMAP", "COCO_MAP_KEYS"]

#: The scalar figures reported (COCO's 12 summary numbers).
COCO_MAP_KEYS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip


class DetectionMAP(ObjectListSync, MeanAveragePrecision):
    """COCO mAP / mAR for boxes (``iou_type="bbox"``) or instance masks (``iou_type="segm"``).

    Every sample is one COCO "image" (a ``(image, category prompt)`` pair when a dataset asks for
    one category per sample), so a sample without ground truth still counts its detections as false
    positives.  Inputs, per sample:

    * targets: ``boxes`` (bbox) or ``masks`` (segm), ``labels`` (one per instance), optional
      ``iscrowd`` (crowd regions are matched as COCO does and never count as misses) and
      ``areas`` (COCO "area"; default box area for bbox, mask area for segm);
    * predictions: ``boxes`` (bbox) or ``masks`` (segm), ``scores`` (``mask_scores`` are used for
      segm when ``scores`` is empty; detections without any score all get 1.0 and are ranked in
      output order), ``labels`` (when empty, the target's single category is used).

    A prediction with ``parsed=False`` contributes no detections (its objects are misses).  A
    predicted box with a NaN/inf coordinate becomes the empty box ``[0, 0, 0, 0]``: a false positive
    at its score.  Non-finite scores or target boxes, label counts that do not match, unlabeled
    detections on a sample whose target has no single category, and masks whose size differs from
    the target's raise ``ValueError`` naming the ``image_id``.  ``compute`` returns the keys of
    :data:`COCO_MAP_KEYS`; -1 marks a figure COCO leaves undefined (e.g. no ground truth at all).

    For segm the underlying metric evaluates ``("bbox", "segm")`` (boxes from masks when the
    prediction has none) because torchmetrics drops mask-less images from a segm-only evaluation,
    which would hide false positives on images without ground truth; only the segm figures are
    reported.
    """

    def __init__(
        self,
        *,
        iou_type: Literal["bbox", "segm"] = "bbox",
        max_detection_thresholds: Sequence[int] = (1, 10, 100),
    ) -> None:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        super().__init__(
            box_format="xyxy",
            iou_type="bbox" if iou_type == "bbox" else ("bbox", "segm"),
            max_detection_thresholds=list(max_detection_thresholds),
            # pycocotools' own float64 thresholds: torchmetrics' defaults come from a float32
            # torch.linspace, which moves recalls such as 3/10 across a threshold and shifts AP
            iou_thresholds=np.linspace(0.5, 0.95, 10, endpoint=True).tolist(),
            rec_thresholds=np.linspace(0.0, 1.00, 101, endpoint=True).tolist(),
            backend="faster_coco_eval",
        )
        self.vlzoo_iou_type = iou_type
        dets = self.max_detection_thresholds
        self.report_keys = (
            "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
            f"mar_{dets[0]}", f"mar_{dets[1]}", f"mar_{dets[2]}", "mar_small", "mar_medium", "mar_large",
        )  # fmt: skip

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

    def _target_dict(self, t: Targets) -> tuple[dict[str, Tensor], tuple[int, int] | None]:
        segm = self.vlzoo_iou_type == "segm"
        check_finite(t.boxes, what="target boxes", image_id=t.image_id, metric="DetectionMAP")
        size: tuple[int, int] | None = tuple(t.image_size) if tuple(t.image_size) != (0, 0) else None
        if segm:
            masks = self._masks(t.masks, size, t.image_id, "targets")
            size = tuple(masks.shape[-2:])
            n = masks.shape[0]
            boxes = t.boxes.detach().cpu().float() if len(t) == n else _boxes_from_masks(masks)
        else:
            boxes = t.boxes.detach().cpu().float().reshape(-1, 4)
            n = boxes.shape[0]
        labels = t.labels.detach().cpu().long().reshape(-1)
        if labels.numel() != n:
            raise ValueError(f"DetectionMAP: target of image_id={t.image_id} has {n} instances but "
                             f"{labels.numel()} labels")
        out = {"boxes": boxes, "labels": labels}
        if segm:
            out["masks"] = masks
        if t.iscrowd is not None:
            if t.iscrowd.numel() != n:
                raise ValueError(f"DetectionMAP: target of image_id={t.image_id} has {n} instances but "
                                 f"{t.iscrowd.numel()} iscrowd flags")
            out["iscrowd"] = t.iscrowd.detach().cpu().long().reshape(-1)
        if t.areas is not None:
            if t.areas.numel() != n:
                raise ValueError(f"DetectionMAP: target of image_id={t.image_id} has {n} instances but "
                                 f"{t.areas.numel()} areas")
            check_finite(t.areas, what="target areas", image_id=t.image_id, metric="DetectionMAP")
            out["area"] = t.areas.detach().cpu().float().reshape(-1)
        return out, size

    def _pred_dict(self, p: Predictions, t: Targets, size: tuple[int, int] | None) -> dict[str, Tensor]:
        segm = self.vlzoo_iou_type == "segm"
        empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
        if segm:
            h, w = size if size is not None else (1, 1)
            empty["masks"] = torch.zeros((0, h, w), dtype=torch.bool)
        if not p.parsed:
            return empty
        if segm:
            if p.masks is None or p.masks.shape[0] == 0:
                return empty
            masks = self._masks(p.masks, size, t.image_id, "predictions")
            n = masks.shape[0]
            boxes = p.boxes.detach().cpu().float() if len(p) == n else _boxes_from_masks(masks)
            scores = p.scores if p.scores.numel() or p.mask_scores is None else p.mask_scores
        else:
            boxes = p.boxes.detach().cpu().float().reshape(-1, 4)
            n = boxes.shape[0]
            scores = p.scores
        if n == 0:
            return empty
        scores = scores.detach().cpu().float().reshape(-1)
        if scores.numel() == 0:
            scores = torch.ones(n)
        if scores.numel() != n:
            raise ValueError(f"DetectionMAP: prediction of image_id={t.image_id} has {n} detections but "
                             f"{scores.numel()} scores")
        check_finite(scores, what="predicted scores", image_id=t.image_id, metric="DetectionMAP")
        labels = p.labels.detach().cpu().long().reshape(-1)
        if labels.numel() == 0:
            categories = torch.unique(t.labels)
            if categories.numel() != 1:
                raise ValueError(
                    f"DetectionMAP: prediction of image_id={t.image_id} has no labels and its target does not "
                    f"name a single category (target labels {t.labels.tolist()}); fill Predictions.labels"
                )
            labels = categories.long().cpu().expand(n).clone()
        if labels.numel() != n:
            raise ValueError(f"DetectionMAP: prediction of image_id={t.image_id} has {n} detections but "
                             f"{labels.numel()} labels")
        bad = ~torch.isfinite(boxes).all(dim=1)
        if bool(bad.any()):
            boxes = boxes.clone()
            boxes[bad] = 0.0
        out = {"boxes": boxes, "scores": scores, "labels": labels}
        if segm:
            out["masks"] = masks
        return out

    def update(self, preds: list[Predictions], targets: list[Targets]) -> None:  # type: ignore[override]
        """Accumulate one batch of samples (original-image pixels)."""
        check_pairs(preds, targets, metric="DetectionMAP")
        tm_preds, tm_targets = [], []
        for p, t in zip(preds, targets, strict=True):
            target, size = self._target_dict(t)
            tm_targets.append(target)
            tm_preds.append(self._pred_dict(p, t, size))
        super().update(tm_preds, tm_targets)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """The 12 COCO summary figures as float32 scalars (keys of :attr:`report_keys`)."""
        if len(self.groundtruth_labels) == 0:
            return {k: torch.tensor(-1.0) for k in self.report_keys}
        result = super().compute()
        prefix = "segm_" if self.vlzoo_iou_type == "segm" else ""
        return {k: result[prefix + k].float().reshape(()) for k in self.report_keys}


def _boxes_from_masks(masks: Tensor) -> Tensor:
    """Tight ``xyxy`` boxes of boolean masks (empty masks give ``[0, 0, 0, 0]``)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4))
    boxes = torch.zeros((masks.shape[0], 4))
    nonempty = masks.flatten(1).any(dim=1)
    if bool(nonempty.any()):
        boxes[nonempty] = masks_to_boxes(masks[nonempty]).float()
    return boxes
