"""GRES / GREC / ignore-region metrics equal a direct computation written from the papers'
definitions (gRefCOCO: Liu et al. CVPR 2023; GREC: He et al. 2023; LISA's ReasonSeg 255 label)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlzoo.evaluation.generalized import (
    GeneralizedReferringBoxes,
    GeneralizedReferringSegmentation,
    TargetsWithIgnore,
    count_matches,
    generalized_baselines,
)
from vlzoo.structures import Predictions, Sample, Targets

H, W = 12, 16


def _mask(*rects: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    for x0, y0, x1, y1 in rects:
        m[y0:y1, x0:x1] = True
    return m


def _target(masks: list[np.ndarray], image_id: int, ignore: np.ndarray | None = None) -> Targets:
    t = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, H, W), dtype=torch.bool)
    kw = dict(masks=t, image_id=image_id, image_size=(H, W))
    if ignore is None:
        return Targets(**kw)
    return TargetsWithIgnore(**kw, ignore_mask=torch.from_numpy(ignore))


def _pred(masks: list[np.ndarray]) -> Predictions:
    t = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, H, W), dtype=torch.bool)
    return Predictions(masks=t)


def _gres_by_definition(pairs: list[tuple[list[np.ndarray], list[np.ndarray]]], ignores=None) -> dict[str, float]:
    """GRES written out: union each side, drop ignored pixels, then the four figures."""
    inter_sum = union_sum = 0
    ious, nt, nt_ok, tg, tg_ok = [], 0, 0, 0, 0
    for k, (gts, prs) in enumerate(pairs):
        keep = np.ones((H, W), bool) if ignores is None or ignores[k] is None else ~ignores[k]
        g = np.zeros((H, W), bool)
        for m in gts:
            g |= m
        p = np.zeros((H, W), bool)
        for m in prs:
            p |= m
        g, p = g & keep, p & keep
        i, u = int((g & p).sum()), int((g | p).sum())
        inter_sum, union_sum = inter_sum + i, union_sum + u
        if not g.any():
            nt += 1
            nt_ok += int(not p.any())
            ious.append(1.0 if not p.any() else 0.0)
        else:
            tg += 1
            tg_ok += int(p.any())
            ious.append(i / u)
    return {"ciou": inter_sum / union_sum, "giou": float(np.mean(ious)),
            "n_acc": nt_ok / nt if nt else -1.0, "t_acc": tg_ok / tg if tg else -1.0}


A = _mask((1, 1, 5, 5))
B = _mask((8, 2, 14, 9))
C = _mask((3, 3, 9, 7))  # overlaps A and B

CASES = [
    ([], []),            # empty vs empty: IoU 1, N-acc hit
    ([], [A]),           # no target, something predicted: IoU 0, union = |A|
    ([A], []),           # something vs empty: IoU 0, T-acc miss
    ([A, B], [A, B]),    # several vs several, exact
    ([A, B], [C]),       # several vs one partial
    ([A], [A, C]),       # one vs several (extra)
    ([B], [C]),          # partial overlap
]


def test_gres_equals_the_definition() -> None:
    metric = GeneralizedReferringSegmentation()
    metric.update([_pred(p) for _, p in CASES[:3]], [_target(g, i) for i, (g, _) in enumerate(CASES[:3])])
    metric.update([_pred(p) for _, p in CASES[3:]], [_target(g, i) for i, (g, _) in enumerate(CASES[3:])])
    out = metric.compute()
    ref = _gres_by_definition([(g, p) for g, p in CASES])
    for key, value in ref.items():
        assert float(out[key]) == pytest.approx(value, abs=1e-6), key
    assert float(out["count"]) == 7 and float(out["no_target_count"]) == 2
    assert ref["n_acc"] == 0.5 and ref["t_acc"] == 0.8  # the cases exercise both sides


def test_gres_single_cases() -> None:
    def one(gts, prs):
        m = GeneralizedReferringSegmentation()
        m.update([_pred(prs)], [_target(gts, 0)])
        return {k: float(v) for k, v in m.compute().items()}

    both_empty = one([], [])
    assert both_empty["giou"] == 1.0 and both_empty["n_acc"] == 1.0 and both_empty["ciou"] == 0.0
    assert both_empty["t_acc"] == -1.0 and both_empty["prec_0.7"] == -1.0  # undefined without target samples
    hallucinated = one([], [A])
    assert hallucinated["giou"] == 0.0 and hallucinated["n_acc"] == 0.0 and hallucinated["ciou"] == 0.0
    missed = one([A], [])
    assert missed["giou"] == 0.0 and missed["t_acc"] == 0.0 and missed["n_acc"] == -1.0
    exact = one([A, B], [B, A])
    assert exact["giou"] == exact["ciou"] == exact["prec_0.9"] == 1.0


def test_unparsed_prediction_is_empty() -> None:
    m = GeneralizedReferringSegmentation()
    m.update([Predictions(masks=torch.from_numpy(A[None]), parsed=False)], [_target([], 0)])
    assert float(m.compute()["n_acc"]) == 1.0


def test_ignore_region_changes_neither_intersection_nor_union() -> None:
    ignore = _mask((0, 0, 4, 12))  # the left quarter, cutting A and C
    gts, prs = [A, B], [C]
    plain = GeneralizedReferringSegmentation().sample_figures(_pred(prs), _target(gts, 0))
    ig = GeneralizedReferringSegmentation().sample_figures(_pred(prs), _target(gts, 0, ignore))
    g = (A | B) & ~ignore
    p = C & ~ignore
    assert ig["intersection"] == (g & p).sum() and ig["union"] == (g | p).sum()
    assert ig["union"] < plain["union"]
    # predicting anything inside the ignore region changes nothing
    noisy = _pred([C, ignore])
    assert GeneralizedReferringSegmentation().sample_figures(noisy, _target(gts, 0, ignore)) == ig
    # the region can also be passed to update (a targets-side tensor), with the same result
    m1, m2 = GeneralizedReferringSegmentation(), GeneralizedReferringSegmentation()
    m1.update([_pred(prs)], [_target(gts, 0, ignore)])
    m2.update([_pred(prs)], [_target(gts, 0)], ignore_masks=[torch.from_numpy(ignore)])
    assert {k: float(v) for k, v in m1.compute().items()} == {k: float(v) for k, v in m2.compute().items()}
    ref = _gres_by_definition([(gts, prs)], [ignore])
    assert float(m1.compute()["ciou"]) == pytest.approx(ref["ciou"]) and float(m1.compute()["giou"]) == pytest.approx(ref["giou"])
    # a target wholly inside the ignore region is a no-target sample; a prediction there is empty
    inside = GeneralizedReferringSegmentation().sample_figures(_pred([A]), _target([A], 0, _mask((0, 0, 6, 6))))
    assert inside["no_target"] and inside["predicted_empty"] and inside["iou"] == 1.0


def test_gres_errors() -> None:
    m = GeneralizedReferringSegmentation()
    with pytest.raises(ValueError, match="image_id=3"):
        m.update([_pred([])], [Targets(image_id=3)])
    with pytest.raises(ValueError, match="ignore mask of image_id=4"):
        m.update([_pred([])], [TargetsWithIgnore(masks=torch.zeros((0, H, W), dtype=torch.bool), image_id=4,
                                                 ignore_mask=torch.zeros((3, 3), dtype=torch.bool))])
    with pytest.raises(ValueError, match="image_id=5"):
        m.update([Predictions(masks=torch.zeros((1, 3, 3), dtype=torch.bool))], [_target([A], 5)])


# --- GREC ------------------------------------------------------------------------------------

def _box(x0, y0, x1, y1):
    return [float(x0), float(y0), float(x1), float(y1)]


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _grec_by_definition(pairs, thr=0.5):
    """Pr@(F1=1, IoU>=thr) as GREC defines it, with the greedy rule spelled out: the highest-IoU
    pair is a TP, its prediction and target leave; no-target samples are right iff nothing is
    predicted."""
    ok, nt, nt_ok, tg, tg_ok = 0, 0, 0, 0, 0
    for gts, prs in pairs:
        if not gts:
            nt += 1
            nt_ok += int(not prs)
            ok += int(not prs)
            continue
        tg += 1
        tg_ok += int(bool(prs))
        free_p, free_g, tp = set(range(len(prs))), set(range(len(gts))), 0
        while free_p and free_g:
            best = max((_iou(prs[i], gts[j]), -i, -j) for i in free_p for j in free_g)
            if best[0] < thr:
                break
            tp += 1
            free_p.discard(-best[1])
            free_g.discard(-best[2])
        fp, fn = len(prs) - tp, len(gts) - tp
        ok += int(2 * tp / (2 * tp + fp + fn) == 1.0)
    return {"pr_f1_0.5": ok / len(pairs), "n_acc": nt_ok / nt, "t_acc": tg_ok / tg}


BOX_CASES = [
    ([], []),                                                         # right: nothing to find, nothing found
    ([], [_box(0, 0, 4, 4)]),                                         # wrong: something predicted
    ([_box(0, 0, 10, 10)], []),                                       # wrong: missed
    ([_box(0, 0, 10, 10), _box(20, 20, 30, 30)], [_box(21, 20, 30, 30), _box(0, 1, 10, 10)]),  # right, any order
    ([_box(0, 0, 10, 10), _box(20, 20, 30, 30)], [_box(0, 0, 10, 10)]),                        # wrong: one missed
    ([_box(0, 0, 10, 10)], [_box(0, 0, 10, 10), _box(1, 1, 10, 10)]),                          # wrong: duplicate
    ([_box(0, 0, 10, 10)], [_box(0, 0, 10, 4)]),                                               # wrong: IoU 0.4
]


def test_grec_equals_the_definition() -> None:
    metric = GeneralizedReferringBoxes()
    preds = [Predictions(boxes=torch.tensor(p).reshape(-1, 4)) for _, p in BOX_CASES]
    targets = [Targets(boxes=torch.tensor(g).reshape(-1, 4), image_id=i) for i, (g, _) in enumerate(BOX_CASES)]
    metric.update(preds, targets)
    out = metric.compute()
    ref = _grec_by_definition(BOX_CASES)
    for key, value in ref.items():
        assert float(out[key]) == pytest.approx(value), key
    assert ref["pr_f1_0.5"] == pytest.approx(2 / 7)
    assert float(out["no_target_count"]) == 2 and float(out["count"]) == 7


def test_grec_score_threshold_unparsed_and_nan() -> None:
    gt = Targets(boxes=torch.tensor([_box(0, 0, 10, 10)]))
    two = Predictions(boxes=torch.tensor([_box(0, 0, 10, 10), _box(50, 50, 60, 60)]), scores=torch.tensor([0.9, 0.3]))
    assert GeneralizedReferringBoxes().sample_figures(two, gt)["f1"] == pytest.approx(2 / 3)
    assert GeneralizedReferringBoxes(score_threshold=0.7).sample_figures(two, gt)["f1"] == 1.0
    nothing = Targets(boxes=torch.zeros((0, 4)))
    assert GeneralizedReferringBoxes().sample_figures(Predictions(boxes=torch.ones(1, 4), parsed=False), nothing)["f1"] == 1.0
    nan = Predictions(boxes=torch.tensor([[float("nan"), 0.0, 10.0, 10.0]]))
    assert GeneralizedReferringBoxes().sample_figures(nan, gt) == {
        "tp": 0, "fp": 1, "fn": 1, "f1": 0.0, "no_target": False, "predicted_empty": False}
    with pytest.raises(ValueError, match="image_id=9"):
        GeneralizedReferringBoxes().update([Predictions()], [Targets(boxes=torch.tensor([[0.0, float("inf"), 1, 1]]), image_id=9)])


def test_greedy_and_optimal_matching_differ_where_greedy_is_myopic() -> None:
    # prediction 0 fits target 0 best (0.9) but also target 1 (0.6); prediction 1 fits only target 0 (0.55)
    ious = torch.tensor([[0.9, 0.6], [0.55, 0.3]])
    assert count_matches(ious, 0.5, "greedy") == 1
    assert count_matches(ious, 0.5, "optimal") == 2
    assert count_matches(torch.zeros((0, 3))) == 0
    with pytest.raises(ValueError, match="matching"):
        count_matches(ious, 0.5, "hungarian")


def test_baselines_use_the_same_metrics() -> None:
    def sample(gts, i):
        t = _target(gts, i)
        boxes = []
        for m in gts:
            ys, xs = np.nonzero(m)
            boxes.append(_box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        t.boxes = torch.tensor(boxes).reshape(-1, 4)
        return Sample(image=torch.zeros((3, H, W), dtype=torch.uint8), task="res", prompt="", targets=t)

    samples = [sample([], 0), sample([A], 1), sample([A, B], 2)]
    everything = sample([A, B], 9).targets  # the image's objects: A and B
    out = generalized_baselines(samples, image_objects=[everything] * 3)
    nothing, every = out["always_nothing"], out["always_everything"]
    assert nothing["rec/n_acc"] == 1.0 and nothing["rec/t_acc"] == 0.0 and nothing["rec/pr_f1_0.5"] == pytest.approx(1 / 3)
    assert nothing["res/giou"] == pytest.approx(1 / 3) and nothing["res/ciou"] == 0.0
    assert every["rec/n_acc"] == 0.0 and every["rec/pr_f1_0.5"] == pytest.approx(1 / 3)  # only the A+B sample
    ref = _gres_by_definition([([], [A, B]), ([A], [A, B]), ([A, B], [A, B])])
    assert every["res/giou"] == pytest.approx(ref["giou"]) and every["res/ciou"] == pytest.approx(ref["ciou"])
    whole = generalized_baselines(samples)["always_everything"]  # no objects: the whole image
    assert whole["res/ciou"] == pytest.approx((A.sum() + (A | B).sum()) / (3 * H * W))


def test_states_are_sums_so_ranks_merge_to_the_whole() -> None:
    """Every state is a sum (``dist_reduce_fx="sum"``): two halves merged equal one pass, also when
    one half holds no sample (an empty rank)."""
    preds = [_pred(p) for _, p in CASES]
    targets = [_target(g, i) for i, (g, _) in enumerate(CASES)]
    whole, first, second, empty = (GeneralizedReferringSegmentation() for _ in range(4))
    whole.update(preds, targets)
    first.update(preds[:3], targets[:3])
    second.update(preds[3:], targets[3:])
    first.merge_state(second)
    first.merge_state(empty)
    assert {k: float(v) for k, v in first.compute().items()} == {k: float(v) for k, v in whole.compute().items()}
    box_preds = [Predictions(boxes=torch.tensor(p).reshape(-1, 4)) for _, p in BOX_CASES]
    box_targets = [Targets(boxes=torch.tensor(g).reshape(-1, 4)) for g, _ in BOX_CASES]
    whole_b, a, b = (GeneralizedReferringBoxes() for _ in range(3))
    whole_b.update(box_preds, box_targets)
    a.update(box_preds[:4], box_targets[:4])
    b.update(box_preds[4:], box_targets[4:])
    a.merge_state(b)
    assert {k: float(v) for k, v in a.compute().items()} == {k: float(v) for k, v in whole_b.compute().items()}
