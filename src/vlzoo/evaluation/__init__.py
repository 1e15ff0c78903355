"""Evaluation: torchmetrics Metrics per output type and the :class:`Evaluator` that groups them into
one ``MetricCollection`` per task.  Every metric consumes ``update(preds: list[Predictions],
targets: list[Targets])`` in original-image pixels.  Definitions and references: docs/evaluation.md.
"""

from vlzoo.evaluation.detection import COCO_MAP_KEYS, DetectionMAP
from vlzoo.evaluation.evaluator import Evaluator
from vlzoo.evaluation.keypoints import COCO_PERSON_SIGMAS, KEYPOINT_KEYS, KeypointAP
from vlzoo.evaluation.referring import ReferringBoxAccuracy, ReferringSegmentation
from vlzoo.evaluation.text import (
    CaptionScores,
    CIDErD,
    ExactMatch,
    ParseFailureRate,
    cider_d,
    normalize_answer,
    tokenize_caption,
)

__all__ = [
    "Evaluator",
    "ReferringBoxAccuracy",
    "ReferringSegmentation",
    "DetectionMAP",
    "KeypointAP",
    "CaptionScores",
    "CIDErD",
    "ExactMatch",
    "ParseFailureRate",
    "cider_d",
    "tokenize_caption",
    "normalize_answer",
    "COCO_MAP_KEYS",
    "KEYPOINT_KEYS",
    "COCO_PERSON_SIGMAS",
]
