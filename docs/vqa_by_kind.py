"""Shapes VQA exact match of a language-model checkpoint (a study's stage 0), by question kind,
against what a model that does not select the referred object would score.

Three of the stage-0 question kinds are about one *referred* object ("what colour is the small
shape left of the circle?", "what shape is ...", "is ... in the left half?"): answering them
needs the object the expression names.  Beside each kind:

* ``random_object`` (colour, shape, position): the exact match of answering for an object of the
  image picked uniformly, in expectation - the score of an LMM that reads the image but not
  which object is meant;
* ``best_constant``: the share of the kind's most frequent answer on the same samples - the
  score of an LMM that reads neither.

A kind whose exact match is well above both is answered by selecting: the LMM resolves the
expression in language, whatever a localization readout later makes of it.

    python docs/vqa_by_kind.py CHECKPOINT [--size 600]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

import torch

REFERRED_KINDS = ("colour", "shape", "position")


def _random_object(kind: str, question: str, answer: str, scene) -> float | None:
    """The expected exact match of answering ``question`` for a uniformly random object."""
    objs = scene.objects
    if kind == "colour":
        return sum(o.colour_name == answer for o in objs) / len(objs)
    if kind == "shape":
        return sum(o.category_name == answer for o in objs) / len(objs)
    if kind == "position":
        side = re.search(r"in the (left|right|top|bottom) half\?", question)
        if side is None:
            return None
        h, w = scene.size
        where = side.group(1)
        says = [
            (o.cx < w / 2) if where == "left" else (o.cx >= w / 2) if where == "right"
            else (o.cy < h / 2) if where == "top" else (o.cy >= h / 2)
            for o in objs
        ]
        return sum(("yes" if s else "no") == answer for s in says) / len(objs)
    return None


@torch.no_grad()
def vqa_by_kind(checkpoint: str, *, size: int = 600) -> dict[str, dict[str, float]]:
    """``{kind: {"n", "exact_match", "best_constant", "random_object"}}`` plus an ``"all"`` row
    (``random_object`` only for the kinds about a referred object)."""
    from vlzoo.build import build
    from vlzoo.checkpoints import load_checkpoint, read_checkpoint
    from vlzoo.data import ShapesDataset
    from vlzoo.evaluation.text import normalize_answer

    model = load_checkpoint(checkpoint)
    if "vqa" not in tuple(getattr(model, "tasks", ()) or ()):
        raise ValueError(f"{checkpoint}: its model answers {list(getattr(model, 'tasks', []))}, not vqa; give a stage-0 "
                         "(language modeling) checkpoint, e.g. <study>/stage0/checkpoints/<run>/last.ckpt")
    model.eval()
    _, recipe = read_checkpoint(checkpoint)
    data = build(recipe, with_trainer=False, with_logger=False).datamodule
    image_size = int(recipe.get("data.test.image_size") or recipe.get("data.train.image_size") or 64)
    dataset = ShapesDataset(split="test", size=size, image_size=image_size, tasks=["vqa"])
    collate = data.collate()
    hits: dict[str, list[float]] = defaultdict(list)
    chance: dict[str, list[float]] = defaultdict(list)
    answers: dict[str, list[str]] = defaultdict(list)
    for start in range(0, size, 32):
        items = [dataset[i] for i in range(start, min(start + 32, size))]
        batch = collate(items)
        for item, pred in zip(items, model.predict(batch), strict=True):
            kind = item.meta["vqa_kind"]
            said = normalize_answer(pred.text or "") if pred.parsed else None
            hit = float(said == normalize_answer(item.answer))
            rand = _random_object(kind, item.prompt, item.answer, dataset.scene(item.image_id))
            for key in (kind, "all"):
                hits[key].append(hit)
                answers[key].append(item.answer)
                if rand is not None:
                    chance[key].append(rand)
    rows = {}
    for k in sorted(hits, key=lambda k: (k == "all", k)):
        common = Counter(answers[k]).most_common(1)[0][1]
        rows[k] = {
            "n": len(hits[k]),
            "exact_match": sum(hits[k]) / len(hits[k]),
            "best_constant": common / len(answers[k]),
            "random_object": sum(chance[k]) / len(chance[k]) if k in REFERRED_KINDS else float("nan"),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--size", type=int, default=600)
    args = parser.parse_args()
    rows = vqa_by_kind(args.checkpoint, size=args.size)
    print("| question kind | samples | exact match | best constant answer | random object |")
    print("|---|---|---|---|---|")
    for kind, row in rows.items():
        rand = "-" if row["random_object"] != row["random_object"] else f"{row['random_object']:.3f}"
        print(f"| {kind} | {row['n']} | {row['exact_match']:.3f} | {row['best_constant']:.3f} | {rand} |")


if __name__ == "__main__":
    main()
