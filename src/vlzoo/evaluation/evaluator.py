"""The evaluator: one fresh ``MetricCollection`` per task (and per split) on demand."""

from __future__ import annotations

from collections.abc import Sequence

from torchmetrics import Metric, MetricCollection

from vlzoo.evaluation.detection import DetectionMAP
from vlzoo.evaluation.generalized import GeneralizedReferringBoxes, GeneralizedReferringSegmentation
from vlzoo.evaluation.keypoints import KeypointAP
from vlzoo.evaluation.referring import ReferringBoxAccuracy, ReferringSegmentation
from vlzoo.evaluation.text import CaptionScores, ExactMatch, ParseFailureRate
from vlzoo.structures import EXPRESSION_KINDS, TASKS

__all__ = ["Evaluator"]


class Evaluator:
    """Builds the metric collection of each task.

    ``collection(task)`` returns a *new* :class:`torchmetrics.MetricCollection` every call (clone it
    or call again per split).  Its ``update(preds: list[Predictions], targets: list[Targets])``
    takes original-image pixels; its ``compute()`` returns a flat ``dict[str, Tensor]`` of scalars:

    ========== ===========================================================================
    task       keys
    ========== ===========================================================================
    rec        ``acc_0.5``, ``acc_0.75``, ``acc_0.9`` (one per ``rec_thresholds``), ``miou``
    res        ``ciou``, ``giou``, ``prec_0.5`` ... ``prec_0.9`` (one per ``res_thresholds``)
    det, seg   ``map``, ``map_50``, ``map_75``, ``map_small``, ``map_medium``, ``map_large``,
               ``mar_1``, ``mar_10``, ``mar_100``, ``mar_small``, ``mar_medium``, ``mar_large``
    pose       ``ap``, ``ap50``, ``ap75``, ``ap_medium``, ``ap_large``, ``ar``, ``ar50``,
               ``ar75``, ``ar_medium``, ``ar_large``
    reg,       ``bleu4``, ``rouge_l``, ``cider``
    caption
    vqa        ``exact_match``
    grec       ``pr_f1_0.5`` (Pr@(F1=1, IoU>=``grec_iou_threshold``)), ``n_acc``, ``t_acc``,
               ``count``, ``no_target_count``
    gres       ``ciou``, ``giou``, ``n_acc``, ``t_acc``, ``prec_0.7`` ... ``prec_0.9`` (one per
               ``gres_thresholds``), ``count``, ``no_target_count``
    ========== ===========================================================================

    grec / gres (generalized referring: zero, one or several referents) are scored by
    :class:`~vlzoo.evaluation.generalized.GeneralizedReferringBoxes` /
    :class:`~vlzoo.evaluation.generalized.GeneralizedReferringSegmentation`, gRefCOCO's
    definitions (docs/evaluation.md).

    plus ``parse_fail_rate`` in every collection, and for rec / res the same figures per kind of
    referring expression, ``by_kind/<kind>/<figure>`` and ``by_kind/<kind>/count``, for the
    samples whose targets name their kind (``Targets.expression_kinds``: every Shapes sample).

    Args:
        tasks: the tasks this evaluator serves (default: all of :data:`vlzoo.structures.TASKS`).
        rec_thresholds: IoU thresholds of the REC accuracies.
        res_thresholds: IoU thresholds of the RES precisions.
        keypoint_sigmas: per-keypoint OKS sigmas (default: the 17 COCO person sigmas).
        keypoint_default_label: category of pose *target* instances whose ``labels`` are empty
            (predictions must carry their labels).
        max_detection_thresholds: COCO's three detection budgets for det / seg recall.
        expression_kinds: the expression kinds rec / res are broken down by (empty: none).
        grec_iou_threshold: the IoU a grec box must reach to match a target box.
        gres_thresholds: IoU thresholds of the gres precisions (over target samples).
    """

    def __init__(
        self,
        *,
        tasks: list[str] | None = None,
        rec_thresholds: Sequence[float] = (0.5, 0.75, 0.9),
        res_thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9),
        keypoint_sigmas: list[float] | None = None,
        keypoint_default_label: int = 1,
        max_detection_thresholds: Sequence[int] = (1, 10, 100),
        expression_kinds: Sequence[str] = EXPRESSION_KINDS,
        grec_iou_threshold: float = 0.5,
        gres_thresholds: Sequence[float] = (0.7, 0.8, 0.9),
    ) -> None:
        chosen = list(TASKS) if tasks is None else list(tasks)
        unknown = [t for t in chosen if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known tasks are {list(TASKS)}")
        self.tasks = chosen
        self.rec_thresholds = tuple(float(t) for t in rec_thresholds)
        self.res_thresholds = tuple(float(t) for t in res_thresholds)
        self.keypoint_sigmas = None if keypoint_sigmas is None else [float(s) for s in keypoint_sigmas]
        self.keypoint_default_label = int(keypoint_default_label)
        self.max_detection_thresholds = tuple(int(d) for d in max_detection_thresholds)
        self.expression_kinds = tuple(str(k) for k in expression_kinds)
        self.grec_iou_threshold = float(grec_iou_threshold)
        self.gres_thresholds = tuple(float(t) for t in gres_thresholds)
        # build each collection once so bad arguments fail at construction, not mid-validation
        for task in self.tasks:
            self.collection(task)

    def _task_metric(self, task: str) -> tuple[str, Metric]:
        if task == "rec":
            return "rec", ReferringBoxAccuracy(thresholds=self.rec_thresholds, kinds=self.expression_kinds)
        if task == "res":
            return "res", ReferringSegmentation(thresholds=self.res_thresholds, kinds=self.expression_kinds)
        if task in ("det", "seg"):
            iou_type = "bbox" if task == "det" else "segm"
            return task, DetectionMAP(iou_type=iou_type, max_detection_thresholds=self.max_detection_thresholds)
        if task == "pose":
            return "pose", KeypointAP(sigmas=self.keypoint_sigmas, default_label=self.keypoint_default_label)
        if task == "grec":
            return "grec", GeneralizedReferringBoxes(iou_threshold=self.grec_iou_threshold)
        if task == "gres":
            return "gres", GeneralizedReferringSegmentation(thresholds=self.gres_thresholds)
        if task in ("reg", "caption"):
            return "caption", CaptionScores()
        return "exact_match", ExactMatch()

    def collection(self, task: str) -> MetricCollection:
        """A new, independent metric collection for ``task`` (see the class docstring for keys)."""
        if task not in self.tasks:
            raise ValueError(f"task {task!r} is not evaluated by this Evaluator (tasks: {self.tasks})")
        name, metric = self._task_metric(task)
        return MetricCollection({name: metric, "parse_fail_rate": ParseFailureRate()}, compute_groups=False)

    def __repr__(self) -> str:
        return (
            f"Evaluator(tasks={self.tasks}, rec_thresholds={self.rec_thresholds}, "
            f"res_thresholds={self.res_thresholds}, keypoint_sigmas={self.keypoint_sigmas})"
        )
