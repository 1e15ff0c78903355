"""Referring metrics: REC box accuracy (RefCOCO protocol) and RES mask IoU (LISA protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def _box_ious(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise IoU of ``(N, 4)`` ``xyxy`` boxes in float64, as :func:`box_iou_pair`; a box with a
    NaN/inf coordinate in ``a`` scores 0."""
    a, b = a.double(), b.double()
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    union = area_a + area_b - inter
    ok = (union > 0) & torch.isfinite(a).all(dim=1)
    return torch.where(ok, inter / torch.where(ok, union, torch.ones_like(union)), torch.zeros_like(union))


def _union(masks: Tensor) -> Tensor:
    """``(N, H, W)`` masks -> their ``(H, W)`` union; booleans as they are, other dtypes above 0.5."""
    binary = masks if masks.dtype == torch.bool else masks > 0.5
    return binary[0] if binary.shape[0] == 1 else binary.any(dim=0)


def _intersection_union_torch(gts: list[Tensor | None], pms: list[Tensor | None], lengths: list[int],
                              device: torch.device) -> tuple[Tensor, Tensor]:
    """The accelerator path of :meth:`ReferringSegmentation.batch_intersection_union` (masks stay on
    ``device``; ``None`` is an empty mask of that sample's ``length`` pixels)."""
    flat = []
    for masks_list in (gts, pms):
        flat.append(torch.cat([
            _union(m).reshape(-1).to(device) if m is not None else torch.zeros(n, dtype=torch.bool, device=device)
            for m, n in zip(masks_list, lengths, strict=True)
        ]))
    g_all, m_all = flat
    return _segment_sums(g_all & m_all, lengths), _segment_sums(g_all | m_all, lengths)


def _np(values: Tensor) -> np.ndarray:
    """A tensor's values as a numpy array (a view for CPU tensors)."""
    if values.requires_grad or values.device.type != "cpu":
        values = values.detach().cpu()
    return values.numpy()


def _union_np(masks: Tensor) -> np.ndarray:
    """:func:`_union` of CPU masks in numpy, flattened."""
    binary = masks.detach().numpy() if masks.dtype == torch.bool else (masks.detach() > 0.5).numpy()
    return (binary[0] if binary.shape[0] == 1 else binary.any(axis=0)).reshape(-1)


def _segment_sums_np(flags: np.ndarray, lengths: list[int]) -> Tensor:
    """Sums (float64) of consecutive segments of ``lengths`` elements of a 1-D bool array."""
    sizes = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    if not flags.size:
        return torch.zeros(len(lengths), dtype=torch.float64)
    sums = np.add.reduceat(flags.view(np.uint8), np.minimum(starts, flags.size - 1), dtype=np.int64)
    return torch.from_numpy(np.where(sizes > 0, sums, 0)).double()  # reduceat gives one element for empty


def _segment_sums(flags: Tensor, lengths: list[int]) -> Tensor:
    """Sums (float64, on the CPU) of consecutive segments of ``lengths`` elements of a 1-D bool tensor
    (any device)."""
    ends = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0).to(flags.device)
    totals = torch.cat([flags.new_zeros(1, dtype=torch.long), torch.cumsum(flags, 0)])[ends].cpu().double()
    totals[1:] -= totals[:-1].clone()
    return totals


def _sample_weights(weights: Sequence[float] | None, n: int) -> Tensor:
    return torch.tensor(_weights(weights, n), dtype=torch.float64)


def _kind_rows(targets: Sequence[Targets], kinds: tuple[str, ...], metric: str) -> tuple[Tensor, Tensor]:
    """``(samples, kind indices)`` of the samples that name a scored expression kind."""
    pairs = [(i, k) for i, t in enumerate(targets) if (k := _kind_index(t, kinds, metric)) is not None]
    rows = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    return rows, torch.tensor([k for _, k in pairs], dtype=torch.long)


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
        return float(self.batch_ious([pred], [target])[0])

    def batch_ious(self, preds: Sequence[Predictions], targets: Sequence[Targets]) -> Tensor:
        """The IoU this metric scores for each sample, float64 ``(B,)``, computed for the whole batch at
        once (validates the targets)."""
        name = "ReferringBoxAccuracy"
        for t in targets:
            if len(t) == 0:
                raise ValueError(f"{name}: the target of image_id={t.image_id} has no box")
        if not targets:
            return torch.zeros(0, dtype=torch.float64)
        target_boxes = [_np(t.boxes).reshape(-1, 4) for t in targets]
        counts = np.array([b.shape[0] for b in target_boxes])
        all_boxes = np.concatenate(target_boxes).astype(np.float64)
        finite = np.isfinite(all_boxes).all(axis=1)
        if not finite.all():
            bad = int(np.repeat(np.arange(len(targets)), counts)[~finite][0])
            check_finite(targets[bad].boxes, what="target boxes", image_id=targets[bad].image_id, metric=name)
        gt = all_boxes[np.cumsum(counts) - counts]  # the referred box: each target's first
        ious = np.zeros(len(targets), dtype=np.float64)
        answering = [i for i, p in enumerate(preds) if p.parsed and len(p) > 0]
        if not answering:
            return torch.from_numpy(ious)
        boxes = [_np(preds[i].boxes).reshape(-1, 4) for i in answering]
        sizes = np.array([b.shape[0] for b in boxes])
        owner = np.repeat(np.arange(len(answering)), sizes)
        # the answer: the top-scored box (first of equal scores), else the first box
        keys = np.concatenate([
            _np(preds[i].scores).reshape(-1).astype(np.float64) if preds[i].scores.numel() == n
            else -np.arange(n, dtype=np.float64)
            for i, n in zip(answering, sizes.tolist(), strict=True)
        ])
        order = np.lexsort((-keys, owner))  # by owner, then by descending key; ties keep box order
        first = np.ones(order.size, dtype=bool)
        first[1:] = owner[order][1:] != owner[order][:-1]
        answer = np.concatenate(boxes).astype(np.float64)[order[first]]
        ious[answering] = _box_ious(torch.from_numpy(answer), torch.from_numpy(gt[answering])).numpy()
        return torch.from_numpy(ious)

    def update(
        self, preds: list[Predictions], targets: list[Targets], weights: Sequence[float] | None = None
    ) -> None:
        """Accumulate one batch of samples (original-image pixels).  ``weights`` (default 1
        each) lets a sample count as a fraction of one: an expectation over several candidate
        answers of one sample (the random-object baseline) is their update with weights 1/n."""
        check_pairs(preds, targets, metric="ReferringBoxAccuracy")
        w = _sample_weights(weights, len(preds))
        ious = self.batch_ious(preds, targets)
        thr = torch.tensor(self.thresholds, dtype=torch.float64)
        hits = (ious[:, None] >= thr).double() * w[:, None]
        self.hits += hits.sum(dim=0).to(self.hits)
        self.iou_sum += (w * ious).sum().to(self.iou_sum)
        self.count += w.sum().to(self.count)
        rows, kind = _kind_rows(targets, self.kinds, "ReferringBoxAccuracy")
        if rows.numel():
            self.kind_hits.index_add_(0, kind.to(self.kind_hits.device), hits[rows].to(self.kind_hits))
            self.kind_iou_sum.index_add_(0, kind.to(self.kind_iou_sum.device), (w * ious)[rows].to(self.kind_iou_sum))
            self.kind_count.index_add_(0, kind.to(self.kind_count.device), w[rows].to(self.kind_count))

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

    def sample_intersection_union(self, pred: Predictions, target: Targets) -> tuple[float, float]:
        """Intersection and union (pixel counts) of the unioned masks of one sample."""
        inter, union = self.batch_intersection_union([pred], [target])
        return float(inter[0]), float(union[0])

    def batch_intersection_union(self, preds: Sequence[Predictions], targets: Sequence[Targets]) -> tuple[Tensor, Tensor]:
        """Intersection and union (pixel counts, float64 ``(B,)``) of each sample's unioned masks.

        Samples are validated one by one (shapes only); the pixel work runs once for the whole batch
        on the masks laid end to end, so samples of different sizes cost no extra passes."""
        name = "ReferringSegmentation"
        sizes: list[tuple[int, int]] = []
        gts: list[Tensor | None] = []
        pms: list[Tensor | None] = []
        for pred, target in zip(preds, targets, strict=True):
            if target.masks is None or target.masks.dim() != 3:
                raise ValueError(f"{name}: the target of image_id={target.image_id} has no (N, H, W) masks")
            size = (int(target.masks.shape[-2]), int(target.masks.shape[-1]))
            if target.image_size != (0, 0) and tuple(target.image_size) != size:
                raise ValueError(
                    f"{name}: target masks of image_id={target.image_id} are {size} but image_size is "
                    f"{tuple(target.image_size)}"
                )
            pm = None
            if pred.parsed and pred.masks is not None and pred.masks.numel() and pred.masks.shape[0] > 0:
                if pred.masks.dim() != 3 or tuple(pred.masks.shape[-2:]) != size:
                    raise ValueError(
                        f"{name}: predicted masks of image_id={target.image_id} have shape "
                        f"{tuple(pred.masks.shape)}, expected (N, {size[0]}, {size[1]})"
                    )
                pm = pred.masks
            gts.append(target.masks if target.masks.shape[0] else None)
            pms.append(pm)
            sizes.append(size)
        if not gts:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        # every sample's pixels end to end: one pass of & / | and one sum per sample, whatever the
        # mix of mask sizes (numpy on the CPU, where its per-call cost is a fraction of torch's)
        lengths = [h * w for h, w in sizes]
        present = [m for m in (*gts, *pms) if m is not None]
        if all(m.device.type == "cpu" for m in present):
            flat_g = [_union_np(g) if g is not None else np.zeros(n, dtype=bool) for g, n in zip(gts, lengths, strict=True)]
            flat_m = [_union_np(m) if m is not None else np.zeros(n, dtype=bool) for m, n in zip(pms, lengths, strict=True)]
            g_all, m_all = np.concatenate(flat_g), np.concatenate(flat_m)
            return _segment_sums_np(g_all & m_all, lengths), _segment_sums_np(g_all | m_all, lengths)
        return _intersection_union_torch(gts, pms, lengths, present[0].device)

    def update(
        self, preds: list[Predictions], targets: list[Targets], weights: Sequence[float] | None = None
    ) -> None:
        """Accumulate one batch of samples (original-image pixels); ``weights`` as in
        :meth:`ReferringBoxAccuracy.update` (``ciou`` then sums weighted pixel counts: the ratio
        of the expected cumulative intersection and union)."""
        check_pairs(preds, targets, metric="ReferringSegmentation")
        w = _sample_weights(weights, len(preds))
        inter, union = self.batch_intersection_union(preds, targets)
        ious = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        thr = torch.tensor(self.thresholds, dtype=torch.float64)
        hits = (ious[:, None] >= thr).double() * w[:, None]
        self.cum_intersection += (w * inter).sum().to(self.cum_intersection)
        self.cum_union += (w * union).sum().to(self.cum_union)
        self.iou_sum += (w * ious).sum().to(self.iou_sum)
        self.hits += hits.sum(dim=0).to(self.hits)
        self.count += w.sum().to(self.count)
        rows, kind = _kind_rows(targets, self.kinds, "ReferringSegmentation")
        if rows.numel():
            for state, values in (
                (self.kind_intersection, (w * inter)[rows]),
                (self.kind_union, (w * union)[rows]),
                (self.kind_iou_sum, (w * ious)[rows]),
                (self.kind_hits, hits[rows]),
                (self.kind_count, w[rows]),
            ):
                state.index_add_(0, kind.to(state.device), values.to(state))

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
