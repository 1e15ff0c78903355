"""COCO keypoint AP by object keypoint similarity (OKS)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from vlzoo.evaluation.cocoeval import coco_summary, paused_gc
from vlzoo.evaluation.common import ObjectListSync, check_finite, check_pairs
from vlzoo.structures import Predictions, Targets

__all__ = ["KeypointAP", "COCO_PERSON_SIGMAS", "KEYPOINT_KEYS", "build_keypoint_coco"]

#: Per-keypoint OKS sigmas of the 17 COCO person keypoints (pycocotools ``Params.setKpParams``).
COCO_PERSON_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)  # fmt: skip

#: The 10 COCO keypoint summary figures, in ``COCOeval.stats`` order.
KEYPOINT_KEYS = ("ap", "ap50", "ap75", "ap_medium", "ap_large", "ar", "ar50", "ar75", "ar_medium", "ar_large")


def build_keypoint_coco(
    *,
    gt_keypoints: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    gt_areas: Sequence[np.ndarray],
    gt_crowd: Sequence[np.ndarray],
    gt_labels: Sequence[np.ndarray],
    dt_keypoints: Sequence[np.ndarray],
    dt_scores: Sequence[np.ndarray],
    dt_labels: Sequence[np.ndarray],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """COCO ground-truth and result datasets (dicts) for per-sample arrays; sample ``i`` is image
    ``i + 1``.  Results get ``bbox`` / ``area`` from the extent of all their keypoints exactly as
    pycocotools' ``COCO.loadRes`` computes them for a keypoint result file (records without
    ``bbox``, the COCO result format)."""

    def flat(arrays: Sequence[np.ndarray], shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
        parts = [np.asarray(a, dtype=dtype).reshape(-1, *shape) for a in arrays]
        return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=dtype)

    def image_ids(arrays: Sequence[np.ndarray]) -> list[int]:
        counts = [np.asarray(a).shape[0] for a in arrays]
        return np.repeat(np.arange(1, len(counts) + 1), counts).tolist()

    k = next((np.asarray(a).shape[1] for a in [*gt_keypoints, *dt_keypoints] if np.asarray(a).ndim == 3), 0)
    gkp, dkp = flat(gt_keypoints, (k, 3)), flat(dt_keypoints, (k, 3))
    gbox, garea = flat(gt_boxes, (4,)), flat(gt_areas, ())
    gcrowd, glab = flat(gt_crowd, (), np.int64), flat(gt_labels, (), np.int64)
    dscore, dlab = flat(dt_scores, ()), flat(dt_labels, (), np.int64)
    categories = sorted({int(c) for c in np.concatenate([glab, dlab]).tolist()})
    images = [{"id": i + 1} for i in range(len(gt_keypoints))]
    gxywh = np.concatenate([gbox[:, :2], gbox[:, 2:] - gbox[:, :2]], axis=1)
    gt_anns = [
        {"id": j, "image_id": i, "category_id": c, "keypoints": kp, "num_keypoints": nk, "area": a, "bbox": b,
         "iscrowd": z}
        for j, (i, c, kp, nk, a, b, z) in enumerate(zip(
            image_ids(gt_keypoints), glab.tolist(), gkp.reshape(-1, 3 * k).tolist(),
            (gkp[:, :, 2] > 0).sum(axis=1).tolist(), garea.tolist(), gxywh.tolist(), gcrowd.tolist(), strict=True),
            start=1)
    ]
    if dkp.shape[0]:
        lo, hi = dkp[:, :, :2].min(axis=1), dkp[:, :, :2].max(axis=1)
    else:
        lo = hi = np.zeros((0, 2))
    dxywh = np.concatenate([lo, hi - lo], axis=1)
    darea = (hi[:, 0] - lo[:, 0]) * (hi[:, 1] - lo[:, 1])
    dt_anns = [
        {"id": j, "image_id": i, "category_id": c, "keypoints": kp, "score": s, "area": a, "bbox": b, "iscrowd": 0}
        for j, (i, c, kp, s, a, b) in enumerate(zip(
            image_ids(dt_keypoints), dlab.tolist(), dkp.reshape(-1, 3 * k).tolist(), dscore.tolist(),
            darea.tolist(), dxywh.tolist(), strict=True), start=1)
    ]
    cats = [{"id": c, "name": str(c)} for c in categories]
    return (
        {"images": images, "annotations": gt_anns, "categories": cats},
        {"images": images, "annotations": dt_anns, "categories": cats},
    )


class KeypointAP(ObjectListSync, Metric):
    """COCO keypoint AP / AR by OKS, as pycocotools' ``COCOeval(iouType="keypoints")`` computes it
    (20 detections per sample, OKS thresholds 0.50:0.05:0.95, areas all / medium / large).

    Each sample is one COCO image.  Inputs, per sample:

    * targets: ``keypoints`` ``(N, K, 3)`` (x, y, visibility), optional ``boxes`` (default: the
      extent of the labelled keypoints), ``areas`` (COCO "area", the OKS scale; default: box area),
      ``iscrowd``, ``labels`` (default ``default_label``).  An instance with no labelled keypoint is
      ignored, as in COCO.
    * predictions: ``keypoints`` ``(M, K, 3)`` (x, y, score - the third channel is not used),
      ``scores`` ``(M,)`` instance scores (all 1.0 when empty), ``labels`` (required when
      ``M > 0``: the metric never takes a prediction's label from the targets or a default).
      ``parsed=False`` means no detections.

    ``K`` must equal ``len(sigmas)``; sizes that disagree and non-finite coordinates raise
    ``ValueError`` naming the ``image_id``.  ``compute`` returns :data:`KEYPOINT_KEYS`; -1 marks a
    figure COCO leaves undefined (no ground truth, or no samples at all).  Evaluation runs the
    ``faster_coco_eval`` implementation of COCOeval on the gathered state.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, *, sigmas: Sequence[float] | None = None, default_label: int = 1) -> None:
        super().__init__()
        self.sigmas = tuple(float(s) for s in (sigmas if sigmas is not None else COCO_PERSON_SIGMAS))
        if not self.sigmas or any(s <= 0 for s in self.sigmas):
            raise ValueError(f"sigmas must be a non-empty list of positive numbers, got {sigmas}")
        self.default_label = int(default_label)
        for name in ("gt_keypoints", "gt_boxes", "gt_areas", "gt_crowd", "gt_labels",
                     "dt_keypoints", "dt_scores", "dt_labels"):  # fmt: skip
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @property
    def num_keypoints(self) -> int:
        return len(self.sigmas)

    def _labels(self, labels: Tensor, n: int, image_id: int, who: str) -> Tensor:
        labels = labels.detach().cpu().long().reshape(-1)
        if labels.numel() == 0 and who == "prediction" and n > 0:
            raise ValueError(
                f"KeypointAP: prediction of image_id={image_id} has {n} instances but no labels; the paradigm must "
                "label them (with the category its query names, Batch.category_ids)"
            )
        if labels.numel() == 0:
            return torch.full((n,), self.default_label, dtype=torch.long)
        if labels.numel() != n:
            raise ValueError(f"KeypointAP: {who} of image_id={image_id} has {n} instances but {labels.numel()} labels")
        return labels

    def _keypoints(self, kp: Tensor | None, image_id: int, who: str) -> Tensor:
        k = self.num_keypoints
        if kp is None:
            return torch.zeros((0, k, 3), dtype=torch.float64)
        if kp.dim() != 3 or kp.shape[1] != k or kp.shape[2] != 3:
            raise ValueError(f"KeypointAP: {who} keypoints of image_id={image_id} have shape {tuple(kp.shape)}, "
                             f"expected (N, {k}, 3)")
        check_finite(kp, what=f"{who} keypoints", image_id=image_id, metric="KeypointAP")
        return kp.detach().cpu().double()

    def update(self, preds: list[Predictions], targets: list[Targets]) -> None:
        """Accumulate one batch of samples (original-image pixels)."""
        check_pairs(preds, targets, metric="KeypointAP")
        for p, t in zip(preds, targets, strict=True):
            gkp = self._keypoints(t.keypoints, t.image_id, "target")
            n = gkp.shape[0]
            if len(t) == n and n > 0:
                check_finite(t.boxes, what="target boxes", image_id=t.image_id, metric="KeypointAP")
                boxes = t.boxes.detach().cpu().double()
            else:
                boxes = _keypoint_extent(gkp)
            if t.areas is not None and t.areas.numel() == n:
                check_finite(t.areas, what="target areas", image_id=t.image_id, metric="KeypointAP")
                areas = t.areas.detach().cpu().double().reshape(-1)
            elif t.areas is not None and t.areas.numel():
                raise ValueError(f"KeypointAP: target of image_id={t.image_id} has {n} instances but "
                                 f"{t.areas.numel()} areas")
            else:
                areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            crowd = torch.zeros(n, dtype=torch.long)
            if t.iscrowd is not None and t.iscrowd.numel():
                if t.iscrowd.numel() != n:
                    raise ValueError(f"KeypointAP: target of image_id={t.image_id} has {n} instances but "
                                     f"{t.iscrowd.numel()} iscrowd flags")
                crowd = t.iscrowd.detach().cpu().long().reshape(-1)
            self.gt_keypoints.append(gkp)
            self.gt_boxes.append(boxes)
            self.gt_areas.append(areas)
            self.gt_crowd.append(crowd)
            self.gt_labels.append(self._labels(t.labels, n, t.image_id, "target"))

            dkp = self._keypoints(p.keypoints if p.parsed else None, t.image_id, "predicted")
            m = dkp.shape[0]
            scores = p.scores.detach().cpu().double().reshape(-1) if p.parsed else torch.zeros(0)
            if m and scores.numel() == 0:
                scores = torch.ones(m, dtype=torch.float64)
            if scores.numel() != m:
                raise ValueError(f"KeypointAP: prediction of image_id={t.image_id} has {m} instances but "
                                 f"{scores.numel()} scores")
            check_finite(scores, what="predicted scores", image_id=t.image_id, metric="KeypointAP")
            self.dt_keypoints.append(dkp)
            self.dt_scores.append(scores.double())
            self.dt_labels.append(self._labels(p.labels if p.parsed else torch.zeros(0), m, t.image_id, "prediction"))

    def compute(self) -> dict[str, Tensor]:
        """The 10 COCO keypoint figures (:data:`KEYPOINT_KEYS`) as float32 scalars."""
        if len(self.gt_keypoints) == 0:
            return {k: torch.tensor(-1.0) for k in KEYPOINT_KEYS}
        with paused_gc():
            return self._evaluate()

    def _evaluate(self) -> dict[str, Tensor]:
        gt, dt = build_keypoint_coco(
            gt_keypoints=[x.numpy() for x in self.gt_keypoints],
            gt_boxes=[x.numpy() for x in self.gt_boxes],
            gt_areas=[x.numpy() for x in self.gt_areas],
            gt_crowd=[x.numpy() for x in self.gt_crowd],
            gt_labels=[x.numpy() for x in self.gt_labels],
            dt_keypoints=[x.numpy() for x in self.dt_keypoints],
            dt_scores=[x.numpy() for x in self.dt_scores],
            dt_labels=[x.numpy() for x in self.dt_labels],
        )
        if not gt["annotations"]:
            return {k: torch.tensor(-1.0) for k in KEYPOINT_KEYS}
        stats = coco_summary(gt, dt, iou_type="keypoints", count=len(KEYPOINT_KEYS), kpt_oks_sigmas=self.sigmas)
        return {k: torch.tensor(float(v), dtype=torch.float32) for k, v in zip(KEYPOINT_KEYS, stats, strict=True)}


def _keypoint_extent(kp: Tensor) -> Tensor:
    """``xyxy`` extent of the labelled (visibility > 0) keypoints per instance; zeros when none."""
    labelled = (kp[:, :, 2] > 0).unsqueeze(-1)
    xy = kp[:, :, :2]
    lo = torch.where(labelled, xy, torch.full_like(xy, math.inf)).amin(dim=1) if kp.shape[0] else xy.sum(1)
    hi = torch.where(labelled, xy, torch.full_like(xy, -math.inf)).amax(dim=1) if kp.shape[0] else xy.sum(1)
    boxes = torch.cat([lo, hi], dim=1).double()
    return torch.where(labelled.any(dim=1), boxes, torch.zeros_like(boxes))
