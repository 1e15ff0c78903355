"""REC / RES metrics agree with a direct numpy computation; edge cases are errors or documented zeros."""

from __future__ import annotations

import pytest
import torch
from evalgen import numpy_rec, numpy_res, rec_samples, res_samples

from vlzoo.evaluation import ReferringBoxAccuracy, ReferringSegmentation
from vlzoo.structures import Predictions, Targets


def test_rec_equals_numpy() -> None:
    preds, targets = rec_samples(0, 300)
    metric = ReferringBoxAccuracy()
    for start in range(0, 300, 32):
        metric.update(preds[start : start + 32], targets[start : start + 32])
    out = metric.compute()
    ref = numpy_rec(preds, targets)
    assert set(out) == {"acc_0.5", "acc_0.75", "acc_0.9", "miou"}
    for key, value in ref.items():
        assert float(out[key]) == pytest.approx(value, abs=1e-6), key
    assert 0.1 < ref["acc_0.5"] < 0.9  # the random inputs exercise both sides of the threshold


def test_rec_top_scored_box_is_the_answer_and_misses_count() -> None:
    gt = Targets(boxes=torch.tensor([[10.0, 10.0, 20.0, 20.0]]), image_id=1)
    right, wrong = [10.0, 10.0, 20.0, 20.0], [50.0, 50.0, 60.0, 60.0]
    metric = ReferringBoxAccuracy(thresholds=(0.5,))
    metric.update(
        [
            Predictions(boxes=torch.tensor([wrong, right]), scores=torch.tensor([0.1, 0.9])),  # hit
            Predictions(boxes=torch.tensor([wrong, right])),  # no scores: first box -> miss
            Predictions(boxes=torch.tensor([right]), parsed=False),  # unparsed -> miss
            Predictions(),  # no box -> miss
            Predictions(boxes=torch.tensor([[float("nan"), 10.0, 20.0, 20.0]])),  # NaN -> miss
        ],
        [gt] * 5,
    )
    assert float(metric.compute()["acc_0.5"]) == pytest.approx(0.2)
    assert float(metric.compute()["miou"]) == pytest.approx(0.2)


def test_rec_errors_and_empty() -> None:
    metric = ReferringBoxAccuracy()
    assert all(float(v) == 0.0 for v in metric.compute().values())
    with pytest.raises(ValueError, match="image_id=5"):
        metric.update([Predictions()], [Targets(image_id=5)])
    with pytest.raises(ValueError, match="image_id=6"):
        metric.update([Predictions()], [Targets(boxes=torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), image_id=6)])
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        metric.update([Predictions(), Predictions()], [Targets(boxes=torch.ones(1, 4))])


def test_res_equals_numpy() -> None:
    preds, targets = res_samples(1, 150)
    metric = ReferringSegmentation()
    for start in range(0, 150, 16):
        metric.update(preds[start : start + 16], targets[start : start + 16])
    out = metric.compute()
    ref = numpy_res(preds, targets)
    assert set(out) == {"ciou", "giou", "prec_0.5", "prec_0.6", "prec_0.7", "prec_0.8", "prec_0.9"}
    for key, value in ref.items():
        assert float(out[key]) == pytest.approx(value, abs=1e-6), key
    assert ref["ciou"] != pytest.approx(ref["giou"], abs=1e-3)  # the two averages really differ


def test_res_union_of_instances_and_empty_prediction() -> None:
    gt = torch.zeros((1, 4, 4), dtype=torch.bool)
    gt[0, :2] = True
    halves = torch.zeros((2, 4, 4), dtype=torch.bool)
    halves[0, 0] = True
    halves[1, 1] = True
    metric = ReferringSegmentation(thresholds=(0.5,))
    metric.update([Predictions(masks=halves), Predictions(masks=torch.zeros((0, 4, 4), dtype=torch.bool))],
                  [Targets(masks=gt, image_size=(4, 4)), Targets(masks=gt, image_size=(4, 4))])
    out = metric.compute()
    assert float(out["giou"]) == pytest.approx(0.5)  # (1 + 0) / 2
    assert float(out["ciou"]) == pytest.approx(8 / 16)
    assert float(out["prec_0.5"]) == pytest.approx(0.5)


def test_res_errors_and_empty() -> None:
    metric = ReferringSegmentation()
    assert all(float(v) == 0.0 for v in metric.compute().values())
    gt = torch.ones((1, 4, 4), dtype=torch.bool)
    with pytest.raises(ValueError, match="image_id=12"):
        metric.update([Predictions(masks=torch.ones((1, 4, 5), dtype=torch.bool))],
                      [Targets(masks=gt, image_id=12, image_size=(4, 4))])
    with pytest.raises(ValueError, match="image_id=13"):
        metric.update([Predictions()], [Targets(masks=gt, image_id=13, image_size=(5, 4))])
    with pytest.raises(ValueError, match="image_id=14"):
        metric.update([Predictions()], [Targets(image_id=14)])


@pytest.mark.parametrize("task", ["rec", "res"])
def test_per_kind_figures_equal_the_metric_on_each_kind_alone(task) -> None:
    kinds = ("attribute", "ordinal", "superlative", "relation")
    preds, targets = rec_samples(2, 200) if task == "rec" else res_samples(3, 120)
    cls = ReferringBoxAccuracy if task == "rec" else ReferringSegmentation
    # every fifth sample has no kind (RefCOCO-like): it counts overall only; "relation" never occurs
    labelled = [t.replace(expression_kinds=[] if i % 5 == 0 else [kinds[i % 3]]) for i, t in enumerate(targets)]
    metric = cls()
    metric.update(preds, labelled)
    out = metric.compute()
    whole = cls()
    whole.update(preds, targets)
    for name, value in whole.compute().items():
        assert float(out[name]) == pytest.approx(float(value), abs=1e-7)
    assert not any(k.startswith("by_kind/relation/") for k in out)
    for kind in kinds[:3]:
        idx = [i for i, t in enumerate(labelled) if t.expression_kinds == [kind]]
        alone = cls()
        alone.update([preds[i] for i in idx], [targets[i] for i in idx])
        assert float(out[f"by_kind/{kind}/count"]) == len(idx)
        for name, value in alone.compute().items():
            assert float(out[f"by_kind/{kind}/{name}"]) == pytest.approx(float(value), abs=1e-7), (kind, name)


def test_unknown_expression_kind_names_the_sample_and_the_key() -> None:
    metric = ReferringBoxAccuracy(kinds=("attribute",))
    target = Targets(boxes=torch.ones(1, 4), image_id=9, expression_kinds=["relation"])
    with pytest.raises(ValueError, match=r"image_id=9 .*'relation'.*evaluator.expression_kinds"):
        metric.update([Predictions()], [target])
    with pytest.raises(ValueError, match="distinct names"):
        ReferringSegmentation(kinds=("a", "a"))


@pytest.mark.parametrize("task", ["rec", "res"])
def test_weights_make_a_sample_count_as_a_fraction(task) -> None:
    preds, targets = rec_samples(4, 30) if task == "rec" else res_samples(5, 30)
    cls = ReferringBoxAccuracy if task == "rec" else ReferringSegmentation
    doubled = cls()
    doubled.update(preds + preds[:10], targets + targets[:10])
    weighted = cls()
    weighted.update(preds, targets, weights=[2.0] * 10 + [1.0] * 20)
    for name, value in doubled.compute().items():
        assert float(weighted.compute()[name]) == pytest.approx(float(value), abs=1e-7), name
    with pytest.raises(ValueError, match="non-negative"):
        weighted.update(preds[:2], targets[:2], weights=[1.0, -1.0])

def test_res_accelerator_path_equals_cpu_path() -> None:
    """The torch path (used when masks live on an accelerator) counts what the numpy path counts;
    run here on CPU tensors, with mixed sizes, several instances, missing masks and a 0-pixel image."""
    from vlzoo.evaluation.referring import _intersection_union_torch

    preds, targets = res_samples(2, 40)
    metric = ReferringSegmentation()
    inter, union = metric.batch_intersection_union(preds, targets)
    gts = [t.masks if t.masks.shape[0] else None for t in targets]
    pms = [p.masks if p.parsed and p.masks is not None and p.masks.shape[0] else None for p in preds]
    lengths = [t.masks.shape[-2] * t.masks.shape[-1] for t in targets]
    t_inter, t_union = _intersection_union_torch([None, *gts], [None, *pms], [0, *lengths], torch.device("cpu"))
    assert torch.equal(t_inter, torch.cat([torch.zeros(1, dtype=torch.float64), inter]))
    assert torch.equal(t_union, torch.cat([torch.zeros(1, dtype=torch.float64), union]))
    assert float(union.sum()) > float(inter.sum()) > 0
