"""Generalized referring metrics: expressions that refer to nothing or to several objects
(gRefCOCO's GRES and GREC) and segmentation with an ignore region (ReasonSeg's 255 label).

Definitions and citations: docs/evaluation.md, "Generalized referring (gRefCOCO) and ReasonSeg".

The ground truth of a sample is a *set*: ``Targets.boxes`` ``(N, 4)`` and ``Targets.masks``
``(N, H, W)`` with ``N = 0`` for a no-target expression.  The ignore region of a sample travels
as :class:`TargetsWithIgnore` (a :class:`~vlzoo.structures.Targets` with an ``ignore_mask``
field, so it flows through the collate into ``Batch.original_targets`` unchanged), or as the
``ignore_masks=`` argument of ``update``.  It is in original pixels only; the resize transform
does not map it (it is evaluation data, never read by a method).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchvision.ops import box_iou

from vlzoo.evaluation.common import check_finite, check_pairs
from vlzoo.evaluation.referring import threshold_key
from vlzoo.structures import Predictions, Sample, Targets

__all__ = [
    "TargetsWithIgnore",
    "GeneralizedReferringSegmentation",
    "GeneralizedReferringBoxes",
    "count_matches",
    "MATCHINGS",
    "always_nothing",
    "always_everything",
    "generalized_baselines",
]

#: how predicted boxes are paired with target boxes (see :func:`count_matches`)
MATCHINGS = ("greedy", "optimal")


@dataclass
class TargetsWithIgnore(Targets):
    """:class:`Targets` with an ignore region: ``ignore_mask`` ``(H, W)`` bool in the pixels of
    ``image_size`` (original pixels), ``True`` where a pixel is scored by neither intersection
    nor union (ReasonSeg's label 255).  ``None``: nothing ignored."""

    ignore_mask: Tensor | None = None


def _ignore_of(target: Targets, given: Tensor | None) -> Tensor | None:
    return given if given is not None else getattr(target, "ignore_mask", None)


def _binary_union(masks: Tensor | None, size: tuple[int, int]) -> Tensor:
    """``(N, H, W)`` masks -> ``(H, W)`` bool union (booleans as they are, other dtypes above 0.5)."""
    if masks is None or masks.dim() != 3 or masks.shape[0] == 0:
        return torch.zeros(size, dtype=torch.bool)
    m = masks.detach().cpu()
    m = m if m.dtype == torch.bool else m > 0.5
    return m.any(dim=0)


class GeneralizedReferringSegmentation(Metric):
    """GRES figures (gRefCOCO; Liu, Ding, Jiang, CVPR 2023) and RES with an ignore region.

    Per sample, the predicted masks are unioned and so are the target masks (zero target masks:
    a no-target sample); pixels of the sample's ignore region are removed from both first.  A
    sample is *no-target* when its target has no pixel left, and *predicted empty* when its
    prediction has none (an unparsed prediction is empty).

    * ``ciou``: cumulative intersection / cumulative union over every sample of the split,
      no-target samples included (their intersection is 0, their union the predicted area), as
      GRES's reference evaluator sums them;
    * ``giou``: mean per-sample IoU, where a no-target sample scores 1 if predicted empty, else 0;
    * ``n_acc``: no-target samples predicted empty / no-target samples;
    * ``t_acc``: target samples predicted non-empty / target samples;
    * ``prec_<t>``: target samples with IoU >= t / target samples (GRES's Pr@0.7/0.8/0.9);
    * ``count``, ``no_target_count``: the number of samples and of no-target samples.

    ``n_acc``, ``t_acc`` and ``prec_<t>`` are ``-1`` when their samples are absent (undefined, as
    COCO's -1); with no samples at all ``ciou`` and ``giou`` are 0.  Divisions are exact (no
    epsilon).  A target without ``(N, H, W)`` masks, or a predicted / ignore mask of another size,
    raises ``ValueError`` naming the ``image_id``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, *, thresholds: Sequence[float] = (0.7, 0.8, 0.9)) -> None:
        super().__init__()
        self.thresholds = tuple(float(t) for t in thresholds)
        if not self.thresholds or any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"GeneralizedReferringSegmentation: thresholds must be IoUs in [0, 1], got {thresholds}")
        for name in ("cum_intersection", "cum_union", "iou_sum", "count", "nt_count", "nt_hits", "t_count", "t_hits"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prec_hits", default=torch.zeros(len(self.thresholds), dtype=torch.float64), dist_reduce_fx="sum")

    def sample_figures(self, pred: Predictions, target: Targets, ignore_mask: Tensor | None = None) -> dict[str, float]:
        """``{"intersection", "union", "iou", "no_target", "predicted_empty"}`` of one sample, as
        this metric scores it (validates the inputs)."""
        name = "GeneralizedReferringSegmentation"
        if target.masks is None or target.masks.dim() != 3:
            raise ValueError(f"{name}: the target of image_id={target.image_id} has no (N, H, W) masks "
                             "(a no-target sample has masks of shape (0, H, W))")
        size = (int(target.masks.shape[-2]), int(target.masks.shape[-1]))
        if target.image_size != (0, 0) and tuple(target.image_size) != size:
            raise ValueError(f"{name}: target masks of image_id={target.image_id} are {size} but image_size is "
                             f"{tuple(target.image_size)}")
        pm = None
        if pred.parsed and pred.masks is not None and pred.masks.numel() and pred.masks.shape[0] > 0:
            if pred.masks.dim() != 3 or tuple(pred.masks.shape[-2:]) != size:
                raise ValueError(f"{name}: predicted masks of image_id={target.image_id} have shape "
                                 f"{tuple(pred.masks.shape)}, expected (N, {size[0]}, {size[1]})")
            pm = pred.masks
        gt = _binary_union(target.masks, size)
        pr = _binary_union(pm, size)
        ignore = _ignore_of(target, ignore_mask)
        if ignore is not None:
            if tuple(ignore.shape) != size:
                raise ValueError(f"{name}: the ignore mask of image_id={target.image_id} has shape "
                                 f"{tuple(ignore.shape)}, expected {size}")
            keep = ~(ignore.detach().cpu().bool())
            gt, pr = gt & keep, pr & keep
        inter = float((gt & pr).sum())
        union = float((gt | pr).sum())
        no_target, empty = not bool(gt.any()), not bool(pr.any())
        if no_target:
            iou = 1.0 if empty else 0.0
        else:
            iou = inter / union
        return {"intersection": inter, "union": union, "iou": iou, "no_target": no_target, "predicted_empty": empty}

    def update(self, preds: list[Predictions], targets: list[Targets],
               ignore_masks: Sequence[Tensor | None] | None = None) -> None:
        """Accumulate a batch (original pixels).  ``ignore_masks`` (one ``(H, W)`` bool or ``None``
        per sample) overrides the targets' own ``ignore_mask``."""
        check_pairs(preds, targets, metric="GeneralizedReferringSegmentation")
        if ignore_masks is not None and len(ignore_masks) != len(targets):
            raise ValueError(f"GeneralizedReferringSegmentation.update got {len(ignore_masks)} ignore masks for "
                             f"{len(targets)} targets")
        thr = torch.tensor(self.thresholds, dtype=torch.float64)
        for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
            f = self.sample_figures(p, t, None if ignore_masks is None else ignore_masks[i])
            self.cum_intersection += f["intersection"]
            self.cum_union += f["union"]
            self.iou_sum += f["iou"]
            self.count += 1
            if f["no_target"]:
                self.nt_count += 1
                self.nt_hits += float(f["predicted_empty"])
            else:
                self.t_count += 1
                self.t_hits += float(not f["predicted_empty"])
                self.prec_hits += (f["iou"] >= thr).double().to(self.prec_hits)

    def compute(self) -> dict[str, Tensor]:
        """``ciou``, ``giou``, ``n_acc``, ``t_acc``, ``prec_<t>``, ``count``, ``no_target_count``
        (float32 scalars)."""
        undefined = torch.tensor(-1.0)
        out = {
            "ciou": (self.cum_intersection / self.cum_union).float() if float(self.cum_union) > 0 else torch.tensor(0.0),
            "giou": (self.iou_sum / self.count.clamp(min=1)).float(),
            "n_acc": (self.nt_hits / self.nt_count).float() if float(self.nt_count) > 0 else undefined,
            "t_acc": (self.t_hits / self.t_count).float() if float(self.t_count) > 0 else undefined,
        }
        for i, t in enumerate(self.thresholds):
            out[threshold_key("prec", t)] = (
                (self.prec_hits[i] / self.t_count).float() if float(self.t_count) > 0 else undefined
            )
        out["count"] = self.count.float()
        out["no_target_count"] = self.nt_count.float()
        return out


def count_matches(ious: Tensor, iou_threshold: float = 0.5, matching: str = "greedy") -> int:
    """The number of one-to-one (prediction, target) pairs with IoU >= ``iou_threshold`` in an
    ``(M, N)`` IoU matrix.

    * ``"greedy"``: the pair of highest IoU is matched first, its row and column removed, and so
      on until the best remaining IoU is below the threshold (GREC's rule that of several
      predictions on one target only the highest-IoU one is a true positive; ties go to the
      first pair in row-major order);
    * ``"optimal"``: the largest number of pairs any one-to-one matching reaches (scipy's
      ``linear_sum_assignment`` on the thresholded matrix); never fewer than greedy.
    """
    if matching not in MATCHINGS:
        raise ValueError(f"count_matches: matching must be one of {MATCHINGS}, got {matching!r}")
    if ious.numel() == 0:
        return 0
    iou = torch.nan_to_num(ious.detach().double().cpu(), nan=0.0)
    if matching == "optimal":
        from scipy.optimize import linear_sum_assignment

        ok = (iou >= iou_threshold).numpy()
        rows, cols = linear_sum_assignment(ok.astype(np.float64), maximize=True)
        return int(ok[rows, cols].sum())
    iou = iou.clone()
    matched = 0
    for _ in range(min(iou.shape)):
        k = int(torch.argmax(iou))
        r, c = divmod(k, iou.shape[1])
        if float(iou[r, c]) < iou_threshold:
            break
        matched += 1
        iou[r, :] = -1.0
        iou[:, c] = -1.0
    return matched


class GeneralizedReferringBoxes(Metric):
    """GREC figures (gRefCOCO's generalized REC; He, Ding, Liu, Jiang 2023).

    Predicted boxes (all of them, or those with score >= ``score_threshold`` when the prediction
    has one score per box) are paired one-to-one with the target boxes at IoU >=
    ``iou_threshold`` (torchvision ``box_iou``; :func:`count_matches` with ``matching``).  With TP
    pairs, FP = predictions - TP and FN = targets - TP, a sample's F1 = 2 TP / (2 TP + FP + FN).

    * ``pr_f1_<iou>`` (``pr_f1_0.5`` reads "Pr@(F1=1, IoU>=0.5)"): the fraction of samples with
      F1 = 1 - every target box matched and no extra prediction; a no-target sample counts iff
      no box is predicted;
    * ``n_acc``: no-target samples without a predicted box / no-target samples;
    * ``t_acc``: target samples with at least one predicted box / target samples;
    * ``count``, ``no_target_count``.

    An unparsed prediction predicts no box.  A predicted box with a NaN/inf coordinate is a box
    that matches nothing.  ``n_acc`` / ``t_acc`` are ``-1`` when their samples are absent; with no
    samples ``pr_f1`` is 0.  A non-finite target box raises ``ValueError`` naming the ``image_id``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, *, iou_threshold: float = 0.5, score_threshold: float | None = None,
                 matching: str = "greedy") -> None:
        super().__init__()
        if not 0.0 <= float(iou_threshold) <= 1.0:
            raise ValueError(f"GeneralizedReferringBoxes: iou_threshold must be in [0, 1], got {iou_threshold}")
        if matching not in MATCHINGS:
            raise ValueError(f"GeneralizedReferringBoxes: matching must be one of {MATCHINGS}, got {matching!r}")
        self.iou_threshold = float(iou_threshold)
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        self.matching = matching
        for name in ("correct", "count", "nt_count", "nt_hits", "t_count", "t_hits"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def predicted_boxes(self, pred: Predictions) -> Tensor:
        """The boxes of ``pred`` this metric scores, ``(M, 4)`` float64."""
        if not pred.parsed or len(pred) == 0:
            return torch.zeros((0, 4), dtype=torch.float64)
        boxes = pred.boxes.detach().cpu().double().reshape(-1, 4)
        if self.score_threshold is not None and pred.scores.numel() == boxes.shape[0]:
            boxes = boxes[pred.scores.detach().cpu().double() >= self.score_threshold]
        return boxes

    def sample_figures(self, pred: Predictions, target: Targets) -> dict[str, Any]:
        """``{"tp", "fp", "fn", "f1", "no_target", "predicted_empty"}`` of one sample."""
        check_finite(target.boxes, what="target boxes", image_id=target.image_id, metric="GeneralizedReferringBoxes")
        gt = target.boxes.detach().cpu().double().reshape(-1, 4)
        boxes = self.predicted_boxes(pred)
        m, n = boxes.shape[0], gt.shape[0]
        tp = count_matches(box_iou(boxes, gt), self.iou_threshold, self.matching) if m and n else 0
        fp, fn = m - tp, n - tp
        f1 = 1.0 if m == n == 0 else 2 * tp / (2 * tp + fp + fn)
        return {"tp": tp, "fp": fp, "fn": fn, "f1": f1, "no_target": n == 0, "predicted_empty": m == 0}

    def update(self, preds: list[Predictions], targets: list[Targets]) -> None:
        """Accumulate a batch (original pixels)."""
        check_pairs(preds, targets, metric="GeneralizedReferringBoxes")
        for p, t in zip(preds, targets, strict=True):
            f = self.sample_figures(p, t)
            self.count += 1
            self.correct += float(f["f1"] == 1.0)
            if f["no_target"]:
                self.nt_count += 1
                self.nt_hits += float(f["predicted_empty"])
            else:
                self.t_count += 1
                self.t_hits += float(not f["predicted_empty"])

    def compute(self) -> dict[str, Tensor]:
        """``pr_f1_<iou>``, ``n_acc``, ``t_acc``, ``count``, ``no_target_count`` (float32 scalars)."""
        undefined = torch.tensor(-1.0)
        return {
            threshold_key("pr_f1", self.iou_threshold): (self.correct / self.count.clamp(min=1)).float(),
            "n_acc": (self.nt_hits / self.nt_count).float() if float(self.nt_count) > 0 else undefined,
            "t_acc": (self.t_hits / self.t_count).float() if float(self.t_count) > 0 else undefined,
            "count": self.count.float(),
            "no_target_count": self.nt_count.float(),
        }


# --- baselines -------------------------------------------------------------------------------

def always_nothing(target: Targets) -> Predictions:
    """The "always nothing" answer to a sample: no box, no mask."""
    h, w = target.image_size
    return Predictions(masks=torch.zeros((0, h, w), dtype=torch.bool), image_id=target.image_id,
                       image_size=target.image_size)


def always_everything(target: Targets, objects: Targets | None = None) -> Predictions:
    """The "always everything" answer: every object of the image (``objects``: its boxes, and its
    masks when it has them), or, without ``objects``, the whole image as one box and one mask."""
    h, w = target.image_size
    if objects is None:
        return Predictions(boxes=torch.tensor([[0.0, 0.0, float(w), float(h)]]), scores=torch.ones(1),
                           masks=torch.ones((1, h, w), dtype=torch.bool), image_id=target.image_id,
                           image_size=target.image_size)
    n = len(objects)
    masks = objects.masks if objects.masks is not None else None
    return Predictions(boxes=objects.boxes.float().reshape(-1, 4), scores=torch.ones(n), masks=masks,
                       image_id=target.image_id, image_size=target.image_size)


def generalized_baselines(
    samples: Sequence[Sample], *, image_objects: Sequence[Targets | None] | None = None,
    iou_threshold: float = 0.5, thresholds: Sequence[float] = (0.7, 0.8, 0.9),
) -> dict[str, dict[str, float]]:
    """Scores of the "always nothing" and "always everything" answers on ``samples``, by the
    same metric code as a model's answers: ``{"always_nothing": {...}, "always_everything":
    {...}}`` with the :class:`GeneralizedReferringBoxes` figures as ``rec/<key>`` and, when every
    sample's target has masks, the :class:`GeneralizedReferringSegmentation` figures as
    ``res/<key>`` (the targets' ignore regions apply).

    ``image_objects[i]`` is every object of sample ``i``'s image (e.g.
    ``GRefCocoDataset.image_objects(i)``); ``None`` (or not given) makes "everything" the whole
    image.  For "everything" as a mask answer, an object set without masks also falls back to
    the whole image.
    """
    targets = [s.targets for s in samples]
    objects = list(image_objects) if image_objects is not None else [None] * len(samples)
    if len(objects) != len(targets):
        raise ValueError(f"generalized_baselines: {len(objects)} image_objects for {len(targets)} samples")
    with_masks = bool(targets) and all(t.masks is not None and t.masks.dim() == 3 for t in targets)
    out: dict[str, dict[str, float]] = {}
    answers = {
        "always_nothing": ([always_nothing(t) for t in targets],) * 2,
        "always_everything": (
            [always_everything(t, o) for t, o in zip(targets, objects, strict=True)],
            [always_everything(t, o if o is not None and o.masks is not None else None)
             for t, o in zip(targets, objects, strict=True)],
        ),
    }
    for name, (box_answers, mask_answers) in answers.items():
        rec = GeneralizedReferringBoxes(iou_threshold=iou_threshold)
        rec.update(box_answers, targets)
        figures = {f"rec/{k}": float(v) for k, v in rec.compute().items()}
        if with_masks:
            res = GeneralizedReferringSegmentation(thresholds=thresholds)
            res.update(mask_answers, targets)
            figures.update({f"res/{k}": float(v) for k, v in res.compute().items()})
        out[name] = figures
    return out
