"""Where a pixel2emb trigger looks: its attention over the image tokens, object by object.

For every REC sample of a checkpoint's test split, the trigger's attention over the image
tokens (``--source cross``: the trigger cross-attention, ``lmm``: the LMM's last-layer attention
at the trigger, as ``paradigm.attention_target`` supervises them), teacher-forced on the
ground-truth answer, is summed over each object of the scene (the share of each grid cell the
object's box covers).  The figures say whether the trigger *finds objects* (``on_objects``: the
attention on any object) and whether it *selects* the referred one (``picks_target``: the
object with the most attention is the referred one; ``chance``: the same for a uniformly random
object; ``target_share``: the referred object's share of the attention on objects).

    python docs/trigger_attention.py CHECKPOINT [--source cross|lmm] [--size 500] [--markdown]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torchvision.ops import box_iou


def trigger_attention(checkpoint: str, *, source: str | None = None, size: int | None = None) -> dict[str, float]:
    """``{"n", "on_objects", "target_share", "picks_target", "chance"}`` over the REC triggers
    of the checkpoint's (first) test split."""
    from vlzoo.build import build
    from vlzoo.checkpoints import load_checkpoint, read_checkpoint
    from vlzoo.paradigms.pixel2emb import Pixel2Emb, box_grid_share

    model = load_checkpoint(checkpoint)
    if not isinstance(model, Pixel2Emb):
        raise TypeError(f"{checkpoint}: a {type(model).__name__}, not pixel2emb: the trigger attention is pixel2emb's")
    source = source or model.attention_target or ("cross" if model.image_attention is not None else "lmm")
    if source == "cross" and model.image_attention is None:
        raise ValueError(f"{checkpoint}: --source cross needs paradigm.image_attention, which this model has not")
    _, recipe = read_checkpoint(checkpoint)
    overrides = [f"data.test.size={size}"] if size and recipe.get("data.test._target_") else []
    if size and not overrides:  # named test splits: size the first
        first = next(iter(recipe.get("data.test") or {}))
        overrides = [f"data.test.{first}.size={size}"]
    data = build(recipe, overrides=overrides, with_trainer=False, with_logger=False).datamodule
    data.setup("test")
    loader = data.test_dataloader()
    if isinstance(loader, list):
        loader = loader[0]
    dataset = getattr(loader.dataset, "dataset", loader.dataset)
    if not hasattr(dataset, "scene"):
        raise TypeError(f"{checkpoint}: its test split is {type(dataset).__name__}, not Shapes (no scene objects)")
    grid = tuple(int(v) for v in model.backbone.feature_grid)
    model.eval()
    on_objects, share, picks, chance = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            out, rows, positions, _, weights = model.read_triggers(batch, attentions=True)
            attention = model.trigger_image_attention(out, rows, positions, weights, source=source)
            for k, r in enumerate(rows.tolist()):
                if batch.tasks[r] != "rec":
                    continue
                scene = dataset.scene(batch.image_ids[r])
                boxes = torch.as_tensor(np.array([o.box for o in scene.objects], dtype=np.float32)).reshape(-1, 4)
                width, height = scene.size
                norm = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
                cover = box_grid_share(norm, grid).flatten(1)  # (objects, P)
                mass = (cover * attention[k].float()[None]).sum(-1)
                target = int(box_iou(boxes, batch.original_targets[r].boxes[:1].float())[:, 0].argmax())
                on_objects.append(float(mass.sum().clamp(max=1.0)))
                share.append(float(mass[target] / mass.sum().clamp(min=1e-12)))
                picks.append(float(int(mass.argmax()) == target))
                chance.append(1.0 / len(boxes))
    n = len(picks)
    if n == 0:
        raise ValueError(f"{checkpoint}: its test split has no REC sample")
    return {
        "n": n,
        "source": source,
        "on_objects": sum(on_objects) / n,
        "target_share": sum(share) / n,
        "picks_target": sum(picks) / n,
        "chance": sum(chance) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--source", choices=["cross", "lmm"], default=None,
                        help="which attention (default: the one the model's attention_target supervised)")
    parser.add_argument("--size", type=int, default=None, help="test samples (default: the recipe's)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    row = trigger_attention(args.checkpoint, source=args.source, size=args.size)
    if args.markdown:
        print("| source | samples | on objects | referred object's share | picks the referred | random object |")
        print("|---|---|---|---|---|---|")
        print(f"| {row['source']} | {row['n']} | {row['on_objects']:.3f} | {row['target_share']:.3f} | "
              f"{row['picks_target']:.3f} | {row['chance']:.3f} |")
    else:
        print(row)


if __name__ == "__main__":
    main()
