"""Baselines a study shows beside its cells: computed by the project, on each cell's own test
splits, with the cell's own evaluator, and without training.

* ``random_object``: the answer is an object of the image picked uniformly at random.  Its
  figures are *expectations*, computed exactly: every object of the image is scored with weight
  ``1 / (objects in the image)`` (``ciou`` is then the ratio of the expected cumulative
  intersection and union).  Needs every object of the image: Shapes (``dataset.scene(i)``).
* ``mean_box``: the mean referred box of the training split (each box relative to its image
  size, the mean scaled to each test image); for RES the mask is that box, filled.
* ``union_of_objects`` (RES only): the union of every object's mask - "mask everything".
* ``always_nothing`` / ``always_everything`` (grec / gres, generalized referring): no box and
  no mask for every expression, or every object of the image (Shapes: its scene; without
  scenes, the whole image); :mod:`vlzoo.evaluation.generalized`'s answers, scored by the
  cell's grec / gres metric.  "Always nothing" reaches N-acc = 1 and, with gIoU, the share of
  no-target samples: the floor a generalized cell's N-acc and gIoU are read against.

A paradigm below ``random_object`` localizes objects but does not select the referred one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from vlzoo.evaluation.generalized import always_everything, always_nothing
from vlzoo.structures import GENERALIZED_TASKS, Predictions, Targets

__all__ = [
    "BASELINES",
    "BASELINE_LABELS",
    "SELECTION_BASELINE",
    "SELECTION_BASELINES",
    "BASELINE_TASKS",
    "mean_box",
    "baseline_figures",
    "generalized_baseline_figures",
    "recipe_baselines",
]

BASELINES = ("random_object", "mean_box", "union_of_objects", "always_nothing", "always_everything")
BASELINE_LABELS = {
    "random_object": "random object",
    "mean_box": "mean training box",
    "union_of_objects": "union of every object",
    "always_nothing": "always nothing",
    "always_everything": "always everything",
}
#: the baseline a cell must beat to show that it selects the referred object
SELECTION_BASELINE = "random_object"
#: the untrained answers a cell must beat to show that it selects: a random object of the image
#: and, for RES, every object at once (a cIoU a model that masks everything reaches); the higher
#: of the two on the same data is the bar (report flags and first paragraph)
SELECTION_BASELINES = ("random_object", "union_of_objects")
BASELINE_TASKS = ("rec", "res", *GENERALIZED_TASKS)


def mean_box(dataset: Any, task: str, *, samples: int) -> Tensor:
    """Mean of the first ``samples`` referred boxes of ``task`` in ``dataset``, each divided by
    its image's (W, H, W, H): a ``(4,)`` float64 box in relative coordinates."""
    total = torch.zeros(4, dtype=torch.float64)
    count = 0
    for i in range(len(dataset)):
        if count >= samples:
            break
        sample = dataset[i]
        if sample.task != task or len(sample.targets) == 0:
            continue
        h, w = sample.targets.image_size
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        total += sample.targets.boxes[0].double() / scale
        count += 1
    if count == 0:
        raise ValueError(f"baselines: the training split has no '{task}' sample to take the mean box of")
    return total / count


def _box_mask(box: Tensor, size: tuple[int, int]) -> Tensor:
    """Pixels whose centre lies inside ``box`` (xyxy, pixels)."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float64)[None, :] + 0.5
    x1, y1, x2, y2 = (float(v) for v in box)
    return (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)


def _answer(box: Tensor, mask: Tensor | None, target: Targets) -> Predictions:
    return Predictions(
        boxes=box.float().reshape(1, 4),
        scores=torch.ones(1),
        masks=None if mask is None else mask[None],
        image_id=target.image_id,
        image_size=target.image_size,
    )


def _task_metric(evaluator: Any, task: str) -> Any:
    collection = evaluator.collection(task)
    return next(metric for name, metric in collection.items() if name != "parse_fail_rate")


def _scene_objects(dataset: Any, index: int, masks: bool) -> Targets | None:
    """Every object of item ``index``'s image as :class:`Targets` (``None`` without scenes)."""
    if not hasattr(dataset, "scene"):
        return None
    scene = dataset.scene(index)
    boxes = torch.tensor([[float(v) for v in o.box] for o in scene.objects], dtype=torch.float32).reshape(-1, 4)
    stacked = torch.stack([torch.from_numpy(scene.mask(j)) for j in range(len(scene.objects))]) if masks else None
    return Targets(boxes=boxes, masks=stacked, image_size=scene.size)


def generalized_baseline_figures(dataset: Any, task: str, evaluator: Any) -> dict[str, dict[str, float]]:
    """``{"always_nothing": {...}, "always_everything": {...}}`` on the grec / gres samples of
    ``dataset``, scored by the evaluator's ``task`` metric."""
    metrics = {"always_nothing": _task_metric(evaluator, task), "always_everything": _task_metric(evaluator, task)}
    seen = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample.task != task:
            continue
        seen += 1
        target = sample.targets
        metrics["always_nothing"].update([always_nothing(target)], [target])
        objects = _scene_objects(dataset, i, masks=task == "gres")
        metrics["always_everything"].update([always_everything(target, objects)], [target])
    if seen == 0:
        return {}
    return {name: {k: float(v) for k, v in metric.compute().items()} for name, metric in metrics.items()}


def baseline_figures(
    dataset: Any, task: str, evaluator: Any, *, train_mean_box: Tensor | None = None
) -> dict[str, dict[str, float]]:
    """``{baseline: {figure: value}}`` on the ``task`` samples of ``dataset``, scored by the
    evaluator's ``task`` metric (figures named as the evaluator names them, per kind included).
    ``random_object`` and ``union_of_objects`` are left out when the dataset has no scenes.
    grec / gres get ``always_nothing`` and ``always_everything`` instead
    (:func:`generalized_baseline_figures`; no mean box)."""
    if task not in BASELINE_TASKS:
        raise ValueError(f"baselines exist for {BASELINE_TASKS}, not {task!r}")
    if task in GENERALIZED_TASKS:
        return generalized_baseline_figures(dataset, task, evaluator)
    if train_mean_box is None:
        raise ValueError(f"baselines: task {task!r} needs train_mean_box (the mean training box)")
    res = task == "res"
    scenes = hasattr(dataset, "scene")
    metrics = {"mean_box": _task_metric(evaluator, task)}
    if scenes:
        metrics["random_object"] = _task_metric(evaluator, task)
        if res:
            metrics["union_of_objects"] = _task_metric(evaluator, task)
    seen = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample.task != task:
            continue
        seen += 1
        target = sample.targets
        h, w = target.image_size
        box = train_mean_box * torch.tensor([w, h, w, h], dtype=torch.float64)
        metrics["mean_box"].update([_answer(box, _box_mask(box, (h, w)) if res else None, target)], [target])
        if not scenes:
            continue
        scene = dataset.scene(i)
        objects = scene.objects
        answers = [
            _answer(torch.as_tensor(o.box, dtype=torch.float64), torch.from_numpy(scene.mask(j)) if res else None, target)
            for j, o in enumerate(objects)
        ]
        metrics["random_object"].update(answers, [target] * len(objects), weights=[1.0 / len(objects)] * len(objects))
        if res:
            union = torch.from_numpy(scene.owner >= 0)
            ys, xs = torch.nonzero(union, as_tuple=True)
            ubox = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float64)
            metrics["union_of_objects"].update([_answer(ubox, union, target)], [target])
    if seen == 0:
        return {}
    return {name: {k: float(v) for k, v in metric.compute().items()} for name, metric in metrics.items()}


def _split_datasets(node: Any, default: str, inject: Mapping[str, Any], allow: Any, key: str) -> dict[str, Any]:
    from vlzoo.config import instantiate

    if node is None:
        return {}
    if isinstance(node, Mapping) and "_target_" not in node:
        return {name: instantiate(v, inject=inject, allow=allow, key=f"{key}.{name}") for name, v in node.items()}
    return {default: instantiate(node, inject=inject, allow=allow, key=key)}


def recipe_baselines(recipe: Any, task: str, *, train_samples: int) -> dict[str, dict[str, float]]:
    """Every baseline on every test split of a resolved recipe:
    ``{baseline: {"<split>/<task>/<figure>": value}}`` - the keys a cell's test metrics have.

    Only the datasets and the evaluator are built (never a model): nothing is trained."""
    from vlzoo.config import instantiate

    allow = recipe.allowed_prefixes
    inject = {"seed": recipe.seed} if recipe.seed is not None else {}
    node = recipe.get("evaluator")
    if node is None:
        raise ValueError("baselines: the recipe has no evaluator slot to score them with")
    evaluator = instantiate(node, allow=allow, key="evaluator")
    train = _split_datasets(recipe.get("data.train"), "train", inject, allow, "data.train")
    if "train" not in train:
        raise ValueError("baselines: the recipe's data slot has no train split (the mean box is taken over it)")
    box = None if task in GENERALIZED_TASKS else mean_box(train["train"], task, samples=train_samples)
    out: dict[str, dict[str, float]] = {}
    for split, dataset in _split_datasets(recipe.get("data.test"), "test", inject, allow, "data.test").items():
        for name, figures in baseline_figures(dataset, task, evaluator, train_mean_box=box).items():
            out.setdefault(name, {}).update({f"{split}/{task}/{k}": v for k, v in figures.items()})
    return out
