"""Detection, instance segmentation and keypoint AP agree with pycocotools' COCOeval to 1e-6."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from evalgen import (
    detection_samples,
    pose_samples,
    pycocotools_detection,
    pycocotools_keypoints,
    pycocotools_on_exported,
    varied_detection_samples,
    varied_pose_samples,
)

from vlzoo.evaluation import COCO_MAP_KEYS, KEYPOINT_KEYS, DetectionMAP, KeypointAP
from vlzoo.predictions import coco_results
from vlzoo.structures import Predictions, Targets


def _figures(result: dict[str, torch.Tensor], keys: tuple[str, ...]) -> np.ndarray:
    return np.array([float(result[k]) for k in keys])


@pytest.mark.parametrize("segm", [False, True], ids=["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_detection_map_equals_pycocotools(segm: bool, seed: int) -> None:
    preds, targets = detection_samples(seed, 42, segm=segm)
    assert any(len(t) == 0 for t in targets) and any(len(p) == 0 for p in preds)
    assert any(bool(t.iscrowd.any()) for t in targets)
    metric = DetectionMAP(iou_type="segm" if segm else "bbox")
    for start in range(0, len(preds), 5):  # several updates, as in a validation loop
        metric.update(preds[start : start + 5], targets[start : start + 5])
    ours = _figures(metric.compute(), COCO_MAP_KEYS)
    ref = pycocotools_detection(preds, targets, segm=segm)
    assert ours[0] > 0.02  # a meaningful, non-degenerate figure
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_detection_unparsed_prediction_counts_as_miss_and_unlabeled_is_refused() -> None:
    gt = Targets(boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]]), labels=torch.tensor([4]), image_id=7)
    hit = Predictions(boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]]), scores=torch.tensor([0.9]), labels=torch.tensor([4]))
    metric = DetectionMAP()
    metric.update([hit, hit.replace(parsed=False)], [gt, gt])
    out = metric.compute()
    # one of two objects found at precision 1: COCO's 101-point interpolation gives 51/101
    assert math.isclose(float(out["map_50"]), 51 / 101, abs_tol=1e-6)
    assert math.isclose(float(out["mar_100"]), 0.5, abs_tol=1e-6)
    # a prediction without labels is a paradigm bug: never filled in from the ground truth
    unlabeled = hit.replace(labels=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="image_id=7 has 1 detections but no labels"):
        DetectionMAP().update([unlabeled], [gt])
    metric = KeypointAP(sigmas=[0.5])
    kp_gt = gt.replace(keypoints=torch.tensor([[[5.0, 5.0, 2.0]]]))
    with pytest.raises(ValueError, match="image_id=7 has 1 instances but no labels"):
        metric.update([unlabeled.replace(keypoints=torch.tensor([[[5.0, 5.0, 1.0]]]))], [kp_gt])


def test_detection_nan_box_is_a_false_positive() -> None:
    gt = Targets(boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]]), labels=torch.tensor([1]), image_id=3)
    good = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    nan = torch.tensor([[float("nan"), 0.0, 10.0, 10.0]])
    clean = DetectionMAP()
    clean.update([Predictions(boxes=good, scores=torch.tensor([0.5]), labels=torch.tensor([1]))], [gt])
    noisy = DetectionMAP()
    noisy.update([Predictions(boxes=torch.cat([good, nan]), scores=torch.tensor([0.5, 0.9]),
                              labels=torch.tensor([1, 1]))], [gt])
    assert float(clean.compute()["map_50"]) == pytest.approx(1.0)
    # the NaN box ranks first and misses: precision 1/2 at recall 1
    assert float(noisy.compute()["map_50"]) == pytest.approx(0.5)


def test_detection_errors_name_the_image() -> None:
    metric = DetectionMAP()
    gt = Targets(boxes=torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), labels=torch.tensor([1]), image_id=41)
    with pytest.raises(ValueError, match="image_id=41"):
        metric.update([Predictions()], [gt])
    gt = Targets(boxes=torch.tensor([[0.0, 0.0, 5.0, 5.0]]), labels=torch.tensor([1, 2]), image_id=42)
    with pytest.raises(ValueError, match="image_id=42"):
        metric.update([Predictions()], [gt])
    no_cat = Targets(image_id=43)
    with pytest.raises(ValueError, match="image_id=43"):
        metric.update([Predictions(boxes=torch.ones(1, 4), scores=torch.ones(1))], [no_cat])
    with pytest.raises(ValueError, match="1 predictions but 2 targets"):
        metric.update([Predictions()], [Targets(), Targets()])
    seg = DetectionMAP(iou_type="segm")
    t = Targets(masks=torch.zeros((1, 8, 8), dtype=torch.bool), labels=torch.tensor([1]), image_id=44,
                image_size=(8, 8))
    p = Predictions(masks=torch.zeros((1, 8, 9), dtype=torch.bool), scores=torch.ones(1), labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="image_id=44"):
        seg.update([p], [t])
    t = Targets(masks=torch.zeros((1, 8, 8), dtype=torch.bool), labels=torch.tensor([1]), image_id=45,
                image_size=(8, 10))
    with pytest.raises(ValueError, match="image_id=45"):
        seg.update([Predictions()], [t])


def test_detection_empty_inputs_are_documented_minus_one() -> None:
    metric = DetectionMAP()
    assert all(float(v) == -1.0 for v in metric.compute().values())
    metric.update([], [])
    assert set(metric.compute()) == set(COCO_MAP_KEYS)
    metric.update([Predictions()], [Targets(image_id=1)])  # no GT, no detections at all
    assert all(float(v) == -1.0 for v in metric.compute().values())


@pytest.mark.parametrize("with_areas", [True, False])
def test_keypoint_ap_equals_pycocotools(with_areas: bool) -> None:
    preds, targets = pose_samples(3, 60, with_areas=with_areas)
    assert any(t.keypoints.shape[0] == 0 for t in targets) and any(p.keypoints.shape[0] == 0 for p in preds)
    metric = KeypointAP()
    for start in range(0, len(preds), 7):
        metric.update(preds[start : start + 7], targets[start : start + 7])
    ours = _figures(metric.compute(), KEYPOINT_KEYS)
    ref = pycocotools_keypoints(preds, targets)
    assert ours[0] > 0.05
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_keypoint_ap_custom_sigmas_equal_pycocotools() -> None:
    sigmas = [0.05, 0.08, 0.1, 0.03, 0.07]
    preds, targets = pose_samples(4, 50, k=5)
    metric = KeypointAP(sigmas=sigmas)
    metric.update(preds, targets)
    np.testing.assert_allclose(_figures(metric.compute(), KEYPOINT_KEYS),
                               pycocotools_keypoints(preds, targets, sigmas), atol=1e-6, rtol=0)
    bad = KeypointAP()  # 17 sigmas vs 5 keypoints
    with pytest.raises(ValueError, match="image_id=2000"):
        bad.update(preds[:1], targets[:1])


def test_keypoint_errors_and_empty() -> None:
    metric = KeypointAP()
    assert all(float(v) == -1.0 for v in metric.compute().values())
    kp = torch.rand(1, 17, 3) * 50
    kp[0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="image_id=9"):
        metric.update([Predictions(keypoints=kp, scores=torch.ones(1))],
                      [Targets(keypoints=torch.rand(1, 17, 3), image_id=9)])
    with pytest.raises(ValueError, match="image_id=10"):
        metric.update([Predictions(keypoints=torch.rand(2, 17, 3), scores=torch.ones(3))],
                      [Targets(keypoints=torch.rand(1, 17, 3), image_id=10)])


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
@pytest.mark.parametrize("seed", [11, 12])
def test_in_process_figures_equal_pycocotools_on_exported_files(iou_type: str, seed: int) -> None:
    """What vlzoo reports during validation is what pycocotools reports on the COCO result file vlzoo
    writes for the same predictions (issue 16: the area that buckets a detection used to differ)."""
    if iou_type == "keypoints":
        preds, targets = varied_pose_samples(seed, 60)
        metric, keys = KeypointAP(), KEYPOINT_KEYS
        # the export must not bucket by the predicted person box: some predictions carry one
        assert any(len(p) and p.keypoints.shape[0] for p in preds)
    else:
        preds, targets = varied_detection_samples(seed, 63, segm=iou_type == "segm")
        metric, keys = DetectionMAP(iou_type=iou_type), COCO_MAP_KEYS
    assert any(not p.parsed for p in preds) and any(p.scores.numel() == 0 and p.parsed for p in preds)
    assert any(bool(t.iscrowd.any()) for t in targets if t.iscrowd is not None and t.iscrowd.numel())
    assert any(t.labels.numel() == 0 for t in targets)  # images without ground truth
    for start in range(0, len(preds), 8):
        metric.update(preds[start : start + 8], targets[start : start + 8])
    ours = _figures(metric.compute(), keys)
    ref = pycocotools_on_exported(preds, targets, iou_type)
    assert ours[0] > 0.02 and (ours[3:6] >= 0).sum() >= 2  # meaningful, with populated area ranges
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_exported_result_files_follow_the_coco_result_format() -> None:
    mask = torch.zeros(2, 10, 20, dtype=torch.bool)
    mask[0, 2:5, 3:9] = True
    kp = torch.tensor([[[1.0, 2.0, 2.0], [5.0, 8.0, 1.0]], [[0.0, 0.0, 0.0], [3.0, 3.0, 2.0]]])
    pred = Predictions(boxes=torch.tensor([[3.0, 2.0, 9.0, 5.0], [float("nan"), 0.0, 1.0, 1.0]]),
                       scores=torch.tensor([0.5, 0.25]), labels=torch.tensor([4, 2]), masks=mask, keypoints=kp,
                       image_id=11, image_size=(10, 20))
    boxes, segms, kps = (coco_results(pred, t) for t in ("bbox", "segm", "keypoints"))
    assert [r["bbox"] for r in boxes] == [[3.0, 2.0, 6.0, 3.0], [0.0, 0.0, 0.0, 0.0]]
    assert all("bbox" not in r for r in segms + kps)  # loadRes then takes the mask area / keypoint extent
    assert segms[0]["segmentation"]["size"] == [10, 20] and isinstance(segms[0]["segmentation"]["counts"], str)
    assert kps[1]["keypoints"] == [0.0, 0.0, 0.0, 3.0, 3.0, 2.0] and kps[0]["score"] == 0.5
    assert coco_results(pred.replace(parsed=False), "bbox") == []
    unlabeled = pred.replace(labels=torch.zeros(0, dtype=torch.long))
    assert [r["category_id"] for r in coco_results(unlabeled, "bbox", category_id=7)] == [7, 7]
    with pytest.raises(ValueError, match="image_id=11"):
        coco_results(unlabeled, "segm")
    with pytest.raises(ValueError, match="image_id=11"):
        coco_results(pred.replace(scores=torch.ones(3)), "keypoints")
    with pytest.raises(ValueError, match="iou_type"):
        coco_results(pred, "boxes")
