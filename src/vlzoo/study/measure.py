"""One measuring harness for every paradigm: inference cost, retention of general ability,
and the gallery of predictions the report shows side by side."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from vlzoo.paradigms.base import to_original
from vlzoo.structures import Batch

__all__ = ["first_test_dataset", "single_batches", "inference_cost", "retention", "gallery"]


def first_test_dataset(datamodule: Any) -> Any:
    datasets = getattr(datamodule, "test_datasets", None) or {}
    if not datasets:
        raise ValueError("the study harness needs a test split: the recipe's data slot has no 'test'")
    return next(iter(datasets.values()))


def single_batches(datamodule: Any, count: int, *, raw_images: bool = False) -> list[Batch]:
    """The first ``count`` test samples, one per batch, collated exactly as in evaluation."""
    dataset = first_test_dataset(datamodule)
    keep = datamodule.keep_raw_images
    datamodule.keep_raw_images = raw_images or keep
    try:
        collate = datamodule.collate()
        return [collate([dataset[i]]) for i in range(min(count, len(dataset)))]
    finally:
        datamodule.keep_raw_images = keep


@torch.no_grad()
def inference_cost(model: Any, datamodule: Any, *, queries: int = 16, warmup: int = 2) -> dict[str, float]:
    """Latency per query and per object at batch size 1, and generated tokens per object.

    Objects are those the query asks for (its targets), so a paradigm is not rewarded for
    answering with fewer boxes.  Tokens are counted from the generated text with the backbone's
    tokenizer (0 for a paradigm that generates nothing)."""
    model.eval()
    batches = single_batches(datamodule, queries + warmup)
    tokenizer = getattr(getattr(model, "backbone", None), "tokenizer", None)
    seconds, objects, tokens = 0.0, 0, 0
    for i, batch in enumerate(batches):
        batch = batch.to(model.device)
        start = time.perf_counter()
        preds = model.predict(batch)
        elapsed = time.perf_counter() - start
        if i < warmup:
            continue
        seconds += elapsed
        objects += max(1, len(batch.targets[0]))
        text = preds[0].text
        if text and tokenizer is not None:
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    measured = max(1, len(batches) - warmup)
    return {
        "cost/latency_ms_per_query": 1000.0 * seconds / measured,
        "cost/latency_ms_per_object": 1000.0 * seconds / max(1, objects),
        "cost/tokens_per_object": tokens / max(1, objects),
    }


@torch.no_grad()
def retention(
    model: Any,
    stage0_recipe: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    samples: int = 128,
    prefix: str = "retention/after",
) -> dict[str, float]:
    """The stage-0 text metrics (VQA exact match, caption scores) of ``model.backbone`` now.

    The backbone is wrapped in the stage-0 paradigm (language modeling) and scored on the first
    ``samples`` of the stage-0 recipe's validation split, with the stage-0 evaluator."""
    from vlzoo.build import build
    from vlzoo.paradigms.language_modeling import LanguageModeling

    backbone = model.backbone
    stage0 = build(stage0_recipe, overrides=overrides, with_trainer=False, with_logger=False)
    evaluator = stage0.evaluator
    if evaluator is None:
        raise ValueError(f"stage-0 recipe {stage0_recipe} has no evaluator slot to measure retention with")
    lm = LanguageModeling(backbone=backbone, evaluator=evaluator, max_new_tokens=stage0.model.max_new_tokens)
    lm.eval()
    dm = stage0.datamodule
    dm.tokenizer = backbone.tokenizer
    dataset = next(iter(dm.val_datasets.values()))
    collate = dm.collate()
    collections: dict[str, Any] = {}
    batch_size = 32
    for start in range(0, min(samples, len(dataset)), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, samples, len(dataset)))]
        batch = collate(items).to(next(backbone.parameters()).device)
        preds = [to_original(p, batch, i) for i, p in enumerate(lm.predict(batch))]
        for i, task in enumerate(batch.tasks):
            if task not in collections:
                collections[task] = evaluator.collection(task)
            collections[task].update([preds[i]], [batch.original_targets[i]])
    out: dict[str, float] = {}
    for task, collection in collections.items():
        for key, value in collection.compute().items():
            out[f"{prefix}/{task}/{key}"] = float(value)
    return out


@torch.no_grad()
def gallery(model: Any, datamodule: Any, folder: str | Path, *, samples: int = 6) -> list[Path]:
    """Overlay PNGs (ground truth and prediction, with the paradigm's evidence) of the first
    ``samples`` test samples: the same samples for every cell of a study."""
    from vlzoo.visualize import draw_overlay

    model.eval()
    folder = Path(folder)
    paths = []
    for i, batch in enumerate(single_batches(datamodule, samples, raw_images=True)):
        pred = to_original(model.predict(batch.to(model.device))[0], batch, 0)
        title = batch.prompts[0][:60]
        paths.append(
            draw_overlay(
                batch.raw_images[0],
                batch.original_targets[0],
                pred,
                folder / f"{i:02d}.png",
                title=title,
                transform=batch.transforms[0],
            )
        )
    return paths
