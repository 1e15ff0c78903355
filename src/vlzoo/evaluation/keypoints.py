"""COCO keypoint AP by object keypoint similarity (OKS)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor
from torchmetrics import Metric

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
    ``i + 1``.  Results get ``bbox`` / ``area`` from their keypoint extent exactly as pycocotools'
    ``COCO.loadRes`` computes them."""
    categories = sorted({int(c) for arr in [*gt_labels, *dt_labels] for c in arr.tolist()})
    images = [{"id": i + 1} for i in range(len(gt_keypoints))]
    gt_anns: list[dict[str, Any]] = []
    for i, (kp, box, area, crowd, lab) in enumerate(zip(gt_keypoints, gt_boxes, gt_areas, gt_crowd, gt_labels, strict=True)):
        for j in range(kp.shape[0]):
            x0, y0, x1, y1 = (float(v) for v in box[j])
            gt_anns.append({
                "id": len(gt_anns) + 1,
                "image_id": i + 1,
                "category_id": int(lab[j]),
                "keypoints": kp[j].reshape(-1).tolist(),
                "num_keypoints": int((kp[j][:, 2] > 0).sum()),
                "area": float(area[j]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": int(crowd[j]),
            })
    dt_anns: list[dict[str, Any]] = []
    for i, (kp, score, lab) in enumerate(zip(dt_keypoints, dt_scores, dt_labels, strict=True)):
        for j in range(kp.shape[0]):
            x, y = kp[j][:, 0], kp[j][:, 1]
            x0, x1, y0, y1 = np.min(x), np.max(x), np.min(y), np.max(y)
            dt_anns.append({
                "id": len(dt_anns) + 1,
                "image_id": i + 1,
                "category_id": int(lab[j]),
                "keypoints": kp[j].reshape(-1).tolist(),
                "score": float(score[j]),
                "area": float((x1 - x0) * (y1 - y0)),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            })
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
      ``scores`` ``(M,)`` instance scores (all 1.0 when empty), ``labels`` (default
      ``default_label``).  ``parsed=False`` means no detections.

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
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(gt)
            coco_dt = COCO(dt)
            evaluator = COCOeval_faster(
                coco_gt, coco_dt, iouType="keypoints", kpt_oks_sigmas=list(self.sigmas),
                print_function=_silent,
            )
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = np.asarray(evaluator.stats, dtype=np.float64)[: len(KEYPOINT_KEYS)]
        return {k: torch.tensor(float(v), dtype=torch.float32) for k, v in zip(KEYPOINT_KEYS, stats, strict=True)}


def _silent(*args: Any, **kwargs: Any) -> None:
    """A print function that prints nothing (COCOeval logs its progress)."""


def _keypoint_extent(kp: Tensor) -> Tensor:
    """``xyxy`` extent of the labelled (visibility > 0) keypoints per instance; zeros when none."""
    boxes = torch.zeros((kp.shape[0], 4), dtype=torch.float64)
    for i in range(kp.shape[0]):
        labelled = kp[i][kp[i][:, 2] > 0]
        if labelled.shape[0]:
            boxes[i] = torch.stack([labelled[:, 0].min(), labelled[:, 1].min(), labelled[:, 0].max(),
                                    labelled[:, 1].max()])
    return boxes
