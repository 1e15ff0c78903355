"""Referring metrics: REC box accuracy (RefCOCO protocol) and RES mask IoU (LISA protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from vlzoo.evaluation.common import check_finite, check_pairs
from vlzoo.structures import EXPRESSION_KINDS, Predictions, Targets

__all__ = ["ReferringBoxAccuracy", "ReferringSegmentation", "box_iou_pair", "threshold_key", "kind_key"]

#: namespace of the per-kind figures: ``by_kind/<kind>/<figure>`` (e.g. ``by_kind/relation/acc_0.5``)
KIND_PREFIX = "by_kind"


def kind_key(kind: str, name: str) -> str:
    """``kind_key("relation", "acc_0.5") == "by_kind/relation/acc_0.5"``: a figure of the samples
    whose expression is of that kind (``by_kind/<kind>/count`` is their number)."""
    return f"{KIND_PREFIX}/{kind}/{name}"


def _check_kinds(kinds: Sequence[str], metric: str) -> tuple[str, ...]:
    out = tuple(str(k) for k in kinds)
    if len(set(out)) != len(out) or any(not k or "/" in k for k in out):
        raise ValueError(f"{metric}: expression kinds must be distinct names without '/', got {list(kinds)}")
    return out


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    out = [float(w) for w in weights]
    if len(out) != n or any(not (w >= 0.0) for w in out):
        raise ValueError(f"referring metrics: weights must be {n} non-negative numbers, got {list(weights)}")
    return out


def _kind_index(target: Targets, kinds: tuple[str, ...], metric: str) -> int | None:
    """Index in ``kinds`` of the sample's expression kind; ``None`` when it has none (or no kinds
    are broken down)."""
    if not kinds or not target.expression_kinds:
        return None
    kind = target.expression_kinds[0]
    if kind not in kinds:
        raise ValueError(
            f"{metric}: the target of image_id={target.image_id} has expression kind {kind!r}, which is not "
            f"one of the kinds scored ({list(kinds)}); add it to evaluator.expression_kinds"
        )
    return kinds.index(kind)


def threshold_key(prefix: str, threshold: float) -> str:
    """``threshold_key("acc", 0.5) == "acc_0.5"``: the shortest decimal form of the threshold.

    The name reads "Acc@0.5"; it is written with ``_`` because MLflow metric names may not
    contain ``@`` (Lightning's MLflow logger would silently rename ``acc@0.5`` to ``acc0.5``)."""
    return f"{prefix}_{threshold:g}"


def box_iou_pair(a: Tensor, b: Tensor) -> float:
    """IoU of two ``xyxy`` boxes in float64 (continuous pixel coordinates, no ``+1``).

    A box with ``x2 < x1`` or ``y2 < y1`` has zero area; a zero union gives IoU 0.
    """
    a = a.double()
    b = b.double()
    iw = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    ih = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[2] - a[0]).clamp(min=0) * (a[3] - a[1]).clamp(min=0)
    area_b = (b[2] - b[0]).clamp(min=0) * (b[3] - b[1]).clamp(min=0)
    union = area_a + area_b - inter
    return float(inter / union) if float(union) > 0 else 0.0


def _check_thresholds(thresholds: Sequence[float], name: str) -> tuple[float, ...]:
    out = tuple(float(t) for t in thresholds)
    if not out or any(not 0.0 <= t <= 1.0 for t in out):
        raise ValueError(f"{name} must be a non-empty sequence of IoU thresholds in [0, 1], got {thresholds}")
    return out


class ReferringBoxAccuracy(Metric):
    """REC accuracy: the fraction of samples whose answer box has IoU >= threshold with the referred
    box (``acc@0.5`` is the "Acc@0.5" / "precision@0.5" of RefCOCO, Shikra, Kosmos-2), and the mean
    IoU (``miou``).

    The answer is the top-scored predicted box (the first box when ``scores`` is empty); the
    referred box is ``targets.boxes[0]``.  A prediction that did not parse, has no box, or whose
    answer box has a NaN/inf coordinate scores IoU 0 (a miss, still counted).  A target without a
    box or with a non-finite box raises ``ValueError`` naming its ``image_id``.  With no samples every
    figure is 0.

    Samples whose target names its expression kind (``Targets.expression_kinds``, e.g. Shapes)
    are also scored per kind: ``by_kind/<kind>/acc_<t>``, ``by_kind/<kind>/miou`` and
    ``by_kind/<kind>/count`` for every kind of ``kinds`` that occurred.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self, *, thresholds: Sequence[float] = (0.5, 0.75, 0.9), kinds: Sequence[str] = EXPRESSION_KINDS
    ) -> None:
        super().__init__()
        self.thresholds = _check_thresholds(thresholds, "thresholds")
        self.kinds = _check_kinds(kinds, "ReferringBoxAccuracy")
        t, k = len(self.thresholds), len(self.kinds)
        self.add_state("hits", default=torch.zeros(t, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kind_hits", default=torch.zeros((k, t), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kind_iou_sum", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kind_count", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def sample_iou(self, pred: Predictions, target: Targets) -> float:
        """The IoU this metric scores for one sample (validates the target)."""
        if len(target) == 0:
            raise ValueError(f"ReferringBoxAccuracy: the target of image_id={target.image_id} has no box")
        check_finite(target.boxes, what="target boxes", image_id=target.image_id, metric="ReferringBoxAccuracy")
        if not pred.parsed or len(pred) == 0:
            return 0.0
        index = 0
        if pred.scores.numel() == len(pred):
            index = int(torch.argmax(pred.scores.float()))
        box = pred.boxes[index]
        if not bool(torch.isfinite(box.float()).all()):
            return 0.0
        return box_iou_pair(box.detach().cpu(), target.boxes[0].detach().cpu())

    def update(
        self, preds: list[Predictions], targets: list[Targets], weights: Sequence[float] | None = None
    ) -> None:
        """Accumulate one batch of samples (original-image pixels).  ``weights`` (default 1
        each) lets a sample count as a fraction of one: an expectation over several candidate
        answers of one sample (the random-object baseline) is their update with weights 1/n."""
        check_pairs(preds, targets, metric="ReferringBoxAccuracy")
        thr = torch.tensor(self.thresholds, dtype=torch.float64)
        for pred, target, w in zip(preds, targets, _weights(weights, len(preds)), strict=True):
            iou = self.sample_iou(pred, target)
            hit = (torch.tensor(iou, dtype=torch.float64) >= thr).to(self.hits) * w
            self.hits += hit
            self.iou_sum += w * iou
            self.count += w
            k = _kind_index(target, self.kinds, "ReferringBoxAccuracy")
            if k is not None:
                self.kind_hits[k] += hit
                self.kind_iou_sum[k] += w * iou
                self.kind_count[k] += w

    def compute(self) -> dict[str, Tensor]:
        """``acc_<t>`` per threshold and ``miou``, float32 scalars (and the same per kind)."""
        n = self.count.clamp(min=1)
        out = {threshold_key("acc", t): (self.hits[i] / n).float() for i, t in enumerate(self.thresholds)}
        out["miou"] = (self.iou_sum / n).float()
        for k, kind in enumerate(self.kinds):
            m = self.kind_count[k]
            if float(m) == 0:
                continue
            for i, t in enumerate(self.thresholds):
                out[kind_key(kind, threshold_key("acc", t))] = (self.kind_hits[k, i] / m).float()
            out[kind_key(kind, "miou")] = (self.kind_iou_sum[k] / m).float()
            out[kind_key(kind, "count")] = m.float()
        return out


class ReferringSegmentation(Metric):
    """RES mask IoU as LISA's evaluation defines it.

    * ``ciou``: cumulative intersection over cumulative union, summed over the whole split;
    * ``giou``: mean over samples of the per-sample IoU;
    * ``prec_<t>``: fraction of samples with per-sample IoU >= t.

    Predicted masks of all instances are unioned (``(N, H, W)`` -> ``(H, W)``), and so are the
    target masks.  Boolean masks are used as they are; other dtypes are thresholded at 0.5.  An
    unparsed prediction or one without masks is an empty mask (IoU 0 against a non-empty target).
    A sample whose target and prediction are both empty has IoU 1 (LISA's "no-object" rule).
    LISA adds 1e-5 / 1e-10 to denominators for numerical safety; here the division is exact.
    A missing target mask, or a predicted / target mask whose size differs from the target's
    raises ``ValueError`` naming the ``image_id``.  With no samples every figure is 0.

    As :class:`ReferringBoxAccuracy`, samples with an expression kind are also scored per kind
    (``by_kind/<kind>/ciou``, ``giou``, ``prec_<t>``, ``count``).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self, *, thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9), kinds: Sequence[str] = EXPRESSION_KINDS
    ) -> None:
        super().__init__()
        self.thresholds = _check_thresholds(thresholds, "thresholds")
        self.kinds = _check_kinds(kinds, "ReferringSegmentation")
        t, k = len(self.thresholds), len(self.kinds)
        self.add_state("hits", default=torch.zeros(t, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cum_intersection", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cum_union", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kind_hits", default=torch.zeros((k, t), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kind_iou_sum", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kind_intersection", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kind_union", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kind_count", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    @staticmethod
    def _binary(masks: Tensor) -> Tensor:
        return masks.bool() if masks.dtype == torch.bool else masks > 0.5

    def sample_intersection_union(self, pred: Predictions, target: Targets) -> tuple[float, float]:
        """Intersection and union (pixel counts) of the unioned masks of one sample."""
        name = "ReferringSegmentation"
        if target.masks is None or target.masks.dim() != 3:
            raise ValueError(f"{name}: the target of image_id={target.image_id} has no (N, H, W) masks")
        size = tuple(target.masks.shape[-2:])
        if target.image_size != (0, 0) and tuple(target.image_size) != size:
            raise ValueError(
                f"{name}: target masks of image_id={target.image_id} are {size} but image_size is "
                f"{tuple(target.image_size)}"
            )
        gt = self._binary(target.masks).any(dim=0) if target.masks.shape[0] else torch.zeros(size, dtype=torch.bool)
        gt = gt.cpu()
        if pred.parsed and pred.masks is not None and pred.masks.numel() and pred.masks.shape[0] > 0:
            if pred.masks.dim() != 3 or tuple(pred.masks.shape[-2:]) != size:
                raise ValueError(
                    f"{name}: predicted masks of image_id={target.image_id} have shape "
                    f"{tuple(pred.masks.shape)}, expected (N, {size[0]}, {size[1]})"
                )
            pm = self._binary(pred.masks).any(dim=0).cpu()
        else:
            pm = torch.zeros(size, dtype=torch.bool)
        inter = float((pm & gt).sum())
        union = float((pm | gt).sum())
        return inter, union

    def update(
        self, preds: list[Predictions], targets: list[Targets], weights: Sequence[float] | None = None
    ) -> None:
        """Accumulate one batch of samples (original-image pixels); ``weights`` as in
        :meth:`ReferringBoxAccuracy.update` (``ciou`` then sums weighted pixel counts: the ratio
        of the expected cumulative intersection and union)."""
        check_pairs(preds, targets, metric="ReferringSegmentation")
        thr = torch.tensor(self.thresholds, dtype=torch.float64)
        for pred, target, w in zip(preds, targets, _weights(weights, len(preds)), strict=True):
            inter, union = self.sample_intersection_union(pred, target)
            iou = inter / union if union > 0 else 1.0
            hit = (torch.tensor(iou, dtype=torch.float64) >= thr).to(self.hits) * w
            self.cum_intersection += w * inter
            self.cum_union += w * union
            self.iou_sum += w * iou
            self.hits += hit
            self.count += w
            k = _kind_index(target, self.kinds, "ReferringSegmentation")
            if k is not None:
                self.kind_intersection[k] += w * inter
                self.kind_union[k] += w * union
                self.kind_iou_sum[k] += w * iou
                self.kind_hits[k] += hit
                self.kind_count[k] += w

    def compute(self) -> dict[str, Tensor]:
        """``ciou``, ``giou`` and ``prec_<t>`` per threshold, float32 scalars (and the same per kind)."""
        out = self._figures(self.cum_intersection, self.cum_union, self.iou_sum, self.hits, self.count)
        for k, kind in enumerate(self.kinds):
            m = self.kind_count[k]
            if float(m) == 0:
                continue
            figures = self._figures(
                self.kind_intersection[k], self.kind_union[k], self.kind_iou_sum[k], self.kind_hits[k], m
            )
            out.update({kind_key(kind, name): value for name, value in figures.items()})
            out[kind_key(kind, "count")] = m.float()
        return out

    def _figures(self, inter: Tensor, union: Tensor, iou_sum: Tensor, hits: Tensor, count: Tensor) -> dict[str, Tensor]:
        n = count.clamp(min=1)
        ciou = inter / union if float(union) > 0 else union * 0
        out = {"ciou": ciou.float(), "giou": (iou_sum / n).float()}
        for i, t in enumerate(self.thresholds):
            out[threshold_key("prec", t)] = (hits[i] / n).float()
        return out
