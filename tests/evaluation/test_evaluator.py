"""Evaluator: one independent, flat-keyed collection per task; the recipe builds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from evalgen import caption_samples, detection_samples, pose_samples, rec_samples, res_samples

from vlzoo.evaluation import Evaluator
from vlzoo.structures import TASKS, Predictions, Targets

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "evaluator" / "default.yaml"

EXPECTED = {
    "rec": {"acc_0.5", "acc_0.75", "acc_0.9", "miou"},
    "res": {"ciou", "giou", "prec_0.5", "prec_0.6", "prec_0.7", "prec_0.8", "prec_0.9"},
    "det": {"map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
            "mar_small", "mar_medium", "mar_large"},
    "pose": {"ap", "ap50", "ap75", "ap_medium", "ap_large", "ar", "ar50", "ar75", "ar_medium", "ar_large"},
    "reg": {"bleu4", "rouge_l", "cider"},
    "vqa": {"exact_match"},
    "grec": {"pr_f1_0.5", "n_acc", "t_acc", "count", "no_target_count"},
    "gres": {"ciou", "giou", "n_acc", "t_acc", "prec_0.7", "prec_0.8", "prec_0.9", "count", "no_target_count"},
}
EXPECTED["seg"] = EXPECTED["det"]
EXPECTED["caption"] = EXPECTED["reg"]


def _generalized_samples(masks: bool) -> tuple[list[Predictions], list[Targets]]:
    """A no-target sample answered empty, a two-object sample answered with both, and one unparsed."""
    box = torch.tensor([[2.0, 2.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    full = torch.zeros((2, 32, 32), dtype=torch.bool)
    full[0, 2:10, 2:10] = True
    full[1, 20:30, 20:30] = True
    none = torch.zeros((0, 32, 32), dtype=torch.bool)
    targets = [Targets(boxes=torch.zeros((0, 4)), masks=none if masks else None, image_size=(32, 32)),
               Targets(boxes=box, masks=full if masks else None, image_size=(32, 32)),
               Targets(boxes=box[:1], masks=full[:1] if masks else None, image_size=(32, 32))]
    preds = [Predictions(masks=none if masks else None), Predictions(boxes=box, masks=full if masks else None),
             Predictions(parsed=False)]
    return preds, targets


def _samples(task: str) -> tuple[list[Predictions], list[Targets]]:
    if task in ("grec", "gres"):
        return _generalized_samples(task == "gres")
    if task == "rec":
        return rec_samples(0, 12)
    if task == "res":
        return res_samples(0, 12)
    if task in ("det", "seg"):
        return detection_samples(0, 8, segm=task == "seg", size=(40, 60))
    if task == "pose":
        return pose_samples(0, 12)
    if task in ("reg", "caption"):
        return caption_samples(0, 12)
    return [Predictions(text="yes"), Predictions(text="no", parsed=False)], [Targets(text="yes"), Targets(text="no")]


@pytest.mark.parametrize("task", TASKS)
def test_collection_keys_are_flat_scalars(task: str) -> None:
    collection = Evaluator().collection(task)
    preds, targets = _samples(task)
    collection.update(preds, targets)
    out = collection.compute()
    assert set(out) == EXPECTED[task] | {"parse_fail_rate"}
    assert all(torch.is_tensor(v) and v.ndim == 0 for v in out.values())
    expected_failures = sum(not p.parsed for p in preds) / len(preds)
    assert float(out["parse_fail_rate"]) == pytest.approx(expected_failures)


def test_collections_are_independent() -> None:
    evaluator = Evaluator(tasks=["rec"])
    train, val = evaluator.collection("rec"), evaluator.collection("rec")
    hit = Predictions(boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    gt = Targets(boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    train.update([hit], [gt])
    val.update([Predictions()], [gt])
    assert float(train.compute()["acc_0.5"]) == 1.0
    assert float(val.compute()["acc_0.5"]) == 0.0
    clone = train.clone()
    clone.reset()
    clone.update([Predictions()], [gt])
    assert float(clone.compute()["miou"]) == 0.0 and float(train.compute()["miou"]) == 1.0


def test_custom_thresholds_and_sigmas() -> None:
    evaluator = Evaluator(tasks=["rec", "res", "pose"], rec_thresholds=(0.3,), res_thresholds=(0.25, 0.5),
                          keypoint_sigmas=[0.1] * 5)
    assert set(evaluator.collection("rec").compute()) == {"acc_0.3", "miou", "parse_fail_rate"}
    assert {"prec_0.25", "prec_0.5"} <= set(evaluator.collection("res").compute())
    preds, targets = pose_samples(0, 4, k=5)
    pose = evaluator.collection("pose")
    pose.update(preds, targets)
    assert float(pose.compute()["ap"]) >= 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        Evaluator(tasks=["rec", "nope"])
    with pytest.raises(ValueError, match="not evaluated"):
        Evaluator(tasks=["rec"]).collection("det")
    with pytest.raises(ValueError, match="thresholds"):
        Evaluator(rec_thresholds=(1.5,))


def test_recipe_builds_the_evaluator() -> None:
    text = RECIPE.read_text()
    assert text.startswith("# ")
    node = yaml.safe_load(text)
    assert node.pop("_target_") == "vlzoo.evaluation.Evaluator"
    evaluator = Evaluator(**node)
    assert evaluator.tasks == list(TASKS)


@pytest.mark.parametrize("task", ["rec", "res"])
def test_referring_collections_break_scores_down_by_expression_kind(task: str) -> None:
    preds, targets = _samples(task)
    kinds = ["attribute", "relation"]
    targets = [t.replace(expression_kinds=[kinds[i % 2]]) for i, t in enumerate(targets)]
    collection = Evaluator().collection(task)
    collection.update(preds, targets)
    out = collection.compute()
    per_kind = {f"by_kind/{k}/{name}" for k in kinds for name in EXPECTED[task] | {"count"}}
    assert set(out) == EXPECTED[task] | {"parse_fail_rate"} | per_kind
    assert float(out["by_kind/attribute/count"]) + float(out["by_kind/relation/count"]) == len(targets)
    plain = Evaluator(expression_kinds=()).collection(task)
    plain.update(preds, targets)
    assert set(plain.compute()) == EXPECTED[task] | {"parse_fail_rate"}
