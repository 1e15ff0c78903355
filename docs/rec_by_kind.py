"""Shapes REC accuracy of a trained checkpoint, broken down by the kind of referring expression.

Shapes expressions are programs (``vlzoo.data.shapes.language.Ref``): an attribute filter alone
("the red circle"), or with an ordinal ("the second small shape from the left"), a superlative
("the topmost square") or a relation to an anchor object ("the circle to the right of the
diamond").  Telling them apart shows *what* a paradigm has learned to select.  Beside each
kind: the random-object baseline (IoU >= 0.5 with one object of the image picked uniformly,
in expectation) on the same samples.  (Every run's evaluator now logs Acc@0.5 per kind,
``test/rec/by_kind/<kind>/acc_0.5``, and a study reports the baselines; this script adds the
"box centre in the target" figure.)

``--boxes masks`` scores a RES checkpoint on REC the way LISA does: the box of each predicted
mask (``torchvision.ops.masks_to_boxes``) against the referred object's box, on the RES samples
of the test split (an empty mask is a miss).

    python docs/rec_by_kind.py CHECKPOINT [--split test] [--size 1000] [--boxes predicted|masks]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from torchvision.ops import box_iou, masks_to_boxes


def rec_by_kind(checkpoint: str, *, split: str = "test", size: int | None = None,
                boxes: str = "predicted") -> dict[str, dict[str, float]]:
    """``{kind: {"n", "acc_0.5", "centre_in_target", "random_object"}}`` plus an ``"all"`` row.

    ``centre_in_target``: the predicted box's centre lies inside the target box - the referred
    object was selected, whether or not the box is the right size.  ``boxes="masks"``: the boxes
    of a RES model's predicted masks, on the split's RES samples."""
    if boxes not in ("predicted", "masks"):
        raise ValueError(f"boxes must be 'predicted' or 'masks', got {boxes!r}")
    task = "rec" if boxes == "predicted" else "res"
    from vlzoo.build import build
    from vlzoo.checkpoints import load_checkpoint, read_checkpoint
    from vlzoo.paradigms.base import to_original

    model = load_checkpoint(checkpoint)
    _, recipe = read_checkpoint(checkpoint)
    overrides = [f"data.{split}.size={size}"] if size else []
    data = build(recipe, overrides=overrides, with_trainer=False, with_logger=False).datamodule
    data.setup("test")
    loader = data.test_dataloader()
    if isinstance(loader, list):  # named test splits: the first is the plain test split
        loader = loader[0]
    dataset = loader.dataset
    dataset = getattr(dataset, "dataset", dataset)  # the datamodule's bad-sample wrapper
    if not hasattr(dataset, "scene"):
        raise TypeError(f"{checkpoint}: its test split is {type(dataset).__name__}, not Shapes; expression kinds exist only on Shapes")
    hits: dict[str, list[float]] = defaultdict(list)
    centred: dict[str, list[float]] = defaultdict(list)
    chance: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for batch in loader:
            predictions = model.predict(batch)
            for i, pred in enumerate(predictions):
                if batch.tasks[i] != task:
                    continue
                pred = to_original(pred, batch, i)
                if boxes == "masks":
                    keep = pred.masks is not None and len(pred.masks) and bool(pred.masks[0].any())
                    pred = pred.replace(boxes=masks_to_boxes(pred.masks[:1].bool()) if keep else pred.boxes[:0])
                target = batch.original_targets[i]
                kind = target.expression_kinds[0]
                ok = inside = 0.0
                if len(pred.boxes):
                    box = pred.boxes[0].float()
                    ok = float(box_iou(box[None], target.boxes[:1].float())[0, 0] >= 0.5)
                    # the right object selected, whatever the box size: its centre lies in the target box
                    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
                    x1, y1, x2, y2 = (float(v) for v in target.boxes[0])
                    inside = float(x1 <= cx <= x2 and y1 <= cy <= y2)
                # every object of the scene: what the random-object baseline picks from
                scene = dataset.scene(batch.image_ids[i])
                objects = torch.as_tensor(np.array([o.box for o in scene.objects], dtype=np.float32)).reshape(-1, 4)
                rand = float((box_iou(objects, target.boxes[:1].float())[:, 0] >= 0.5).float().mean())
                for key in (kind, "all"):
                    hits[key].append(ok)
                    centred[key].append(inside)
                    chance[key].append(rand)
    return {
        k: {
            "n": len(hits[k]),
            "acc_0.5": sum(hits[k]) / len(hits[k]),
            "centre_in_target": sum(centred[k]) / len(centred[k]),
            "random_object": sum(chance[k]) / len(chance[k]),
        }
        for k in sorted(hits, key=lambda k: (k == "all", k))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--boxes", choices=("predicted", "masks"), default="predicted")
    args = parser.parse_args()
    rows = rec_by_kind(args.checkpoint, split=args.split, size=args.size, boxes=args.boxes)
    print("| expression kind | samples | Acc@0.5 | box centre in the target | random object (Acc@0.5) |")
    print("|---|---|---|---|---|")
    for kind, row in rows.items():
        print(f"| {kind} | {row['n']} | {row['acc_0.5']:.3f} | {row['centre_in_target']:.3f} | {row['random_object']:.3f} |")


if __name__ == "__main__":
    main()
