"""Baselines equal a direct computation on a known split, and are computed without a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from vlzoo.config import recipe_from_dict
from vlzoo.data import ShapesDataset
from vlzoo.evaluation import Evaluator
from vlzoo.study.baselines import baseline_figures, mean_box, recipe_baselines


def _iou_masks(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    return float((a & b).sum()), float((a | b).sum())


def test_random_object_mean_box_and_union_equal_a_direct_computation():
    train = ShapesDataset(split="train", tasks=["res"], size=50)
    test = ShapesDataset(split="test", tasks=["res"], size=40)
    # the mean box, directly: every referred box over its image size
    boxes = np.array([train[i].targets.boxes[0].numpy() / 64.0 for i in range(50)])
    box = mean_box(train, "res", samples=50)
    assert box.numpy() == pytest.approx(boxes.mean(0), abs=1e-6)
    assert mean_box(train, "res", samples=10).numpy() == pytest.approx(boxes[:10].mean(0), abs=1e-6)

    got = baseline_figures(test, "res", Evaluator(tasks=["res"]), train_mean_box=box)
    rand_iou, rand_i, rand_u, uni_i, uni_u, kinds = [], [], [], [], [], {}
    for i in range(40):
        s, scene = test[i], test.scene(i)
        gt = s.targets.masks[0].numpy()
        per = [_iou_masks(scene.mask(j), gt) for j in range(len(scene.objects))]
        rand_i.append(np.mean([p[0] for p in per]))
        rand_u.append(np.mean([p[1] for p in per]))
        rand_iou.append(np.mean([p[0] / p[1] for p in per]))
        kinds.setdefault(s.targets.expression_kinds[0], []).append(rand_iou[-1])
        inter, union = _iou_masks(scene.owner >= 0, gt)
        uni_i.append(inter)
        uni_u.append(union)
    r = got["random_object"]
    assert r["giou"] == pytest.approx(np.mean(rand_iou), abs=1e-6)
    assert r["ciou"] == pytest.approx(sum(rand_i) / sum(rand_u), abs=1e-6)
    for kind, values in kinds.items():
        assert r[f"by_kind/{kind}/giou"] == pytest.approx(np.mean(values), abs=1e-6)
        assert r[f"by_kind/{kind}/count"] == pytest.approx(len(values))
    assert got["union_of_objects"]["ciou"] == pytest.approx(sum(uni_i) / sum(uni_u), abs=1e-6)
    assert 0.0 < r["ciou"] < got["union_of_objects"]["ciou"] < 1.0


def test_rec_random_object_is_the_mean_over_objects_not_a_sample():
    test = ShapesDataset(split="val", tasks=["rec"], size=60)
    box = torch.tensor([0.3, 0.3, 0.7, 0.7], dtype=torch.float64)
    got = baseline_figures(test, "rec", Evaluator(tasks=["rec"]), train_mean_box=box)
    hits, ious, mean_hits = [], [], []
    for i in range(60):
        target = test[i].targets.boxes[:1]
        objects = torch.tensor(np.array([o.box for o in test.scene(i).objects]), dtype=torch.float32)
        iou = box_iou(objects, target)[:, 0]
        hits.append(float((iou >= 0.5).float().mean()))
        ious.append(float(iou.mean()))
        mean_hits.append(float(box_iou((box * 64).float()[None], target)[0, 0] >= 0.5))
    assert got["random_object"]["acc_0.5"] == pytest.approx(np.mean(hits), abs=1e-6)
    assert got["random_object"]["miou"] == pytest.approx(np.mean(ious), abs=1e-5)
    assert got["mean_box"]["acc_0.5"] == pytest.approx(np.mean(mean_hits), abs=1e-6)
    assert "union_of_objects" not in got  # a RES baseline only


def test_one_object_per_image_makes_the_random_object_the_answer():
    test = ShapesDataset(rung="one", split="test", tasks=["rec"], size=20)
    got = baseline_figures(test, "rec", Evaluator(tasks=["rec"]), train_mean_box=torch.tensor([0, 0, 1, 1.0]))
    assert got["random_object"]["acc_0.9"] == pytest.approx(1.0)


def test_recipe_baselines_name_figures_as_the_cells_do():
    shapes = {"_target_": "vlzoo.data.ShapesDataset", "tasks": ["rec"], "size": 12}
    recipe = recipe_from_dict(
        {
            "seed": 0,
            "evaluator": {"_target_": "vlzoo.evaluation.Evaluator", "tasks": ["rec"]},
            "data": {
                "_target_": "vlzoo.data.VLDataModule",
                "train": {**shapes, "split": "train"},
                "test": {"test": {**shapes, "split": "test"}, "comp_test": {**shapes, "split": "comp_test"}},
            },
        }
    )
    got = recipe_baselines(recipe, "rec", train_samples=12)
    assert set(got) == {"random_object", "mean_box"}
    assert {"test/rec/acc_0.5", "comp_test/rec/acc_0.5", "test/rec/miou"} <= set(got["random_object"])
    direct = baseline_figures(
        ShapesDataset(split="test", tasks=["rec"], size=12, seed=0),
        "rec",
        Evaluator(tasks=["rec"]),
        train_mean_box=mean_box(ShapesDataset(split="train", tasks=["rec"], size=12), "rec", samples=12),
    )
    assert got["random_object"]["test/rec/acc_0.5"] == pytest.approx(direct["random_object"]["acc_0.5"])
    assert got["mean_box"]["test/rec/miou"] == pytest.approx(direct["mean_box"]["miou"])


@pytest.mark.parametrize("task", ["grec", "gres"])
def test_generalized_baselines_equal_a_direct_computation(task):
    """grec / gres get "always nothing" and "always everything" (every object of the scene)."""
    test = ShapesDataset(split="test", tasks=[task], size=40, referents={"none": 0.3, "one": 0.4, "several": 0.3})
    got = baseline_figures(test, task, Evaluator(tasks=[task]))
    assert set(got) == {"always_nothing", "always_everything"}
    none = [len(test[i].targets) == 0 for i in range(40)]
    nothing, everything = got["always_nothing"], got["always_everything"]
    assert nothing["n_acc"] == 1.0 and nothing["t_acc"] == 0.0
    assert everything["n_acc"] == 0.0 and everything["t_acc"] == 1.0
    if task == "grec":  # F1 = 1 exactly when the answer is the target set
        assert nothing["pr_f1_0.5"] == pytest.approx(np.mean(none))
        whole = [len(test[i].targets) == len(test.scene(i).objects) for i in range(40)]
        assert everything["pr_f1_0.5"] == pytest.approx(np.mean(whole))
    else:  # gIoU of "nothing": the share of no-target samples; of "everything": IoU with every object
        assert nothing["giou"] == pytest.approx(np.mean(none)) and nothing["ciou"] == 0.0
        ious = []
        for i in range(40):
            gt = np.zeros((64, 64), dtype=bool)
            for k in test[i].meta["object_ids"]:
                gt |= test.scene(i).mask(k)
            inter, union = _iou_masks(test.scene(i).owner >= 0, gt)
            ious.append(inter / union if gt.any() else 0.0)
        assert everything["giou"] == pytest.approx(np.mean(ious), abs=1e-6)
