"""Write Shapes scenes as COCO JSON + PNG images and a REFER-style refs pickle.

The files are the release formats the real-data readers read, so the same synthetic data
exercises :class:`~vlzoo.data.coco.CocoDataset` and :class:`~vlzoo.data.refcoco.RefCocoDataset`
and any external COCO tool.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from vlzoo.data.shapes.dataset import ShapesDataset
from vlzoo.data.shapes.language import choose_reference, render
from vlzoo.data.shapes.world import SHAPES_CATEGORIES

__all__ = ["export_shapes_coco"]


def export_shapes_coco(
    dataset: ShapesDataset,
    out_dir: str | Path,
    *,
    num_images: int | None = None,
    refs_split: str | None = None,
    sentences_per_ref: int = 2,
) -> dict[str, Path]:
    """Export the first ``num_images`` scenes of ``dataset`` (all by default).

    Writes ``images/{index:06d}.png``, ``annotations/instances.json`` (every object: ``bbox``
    ``[x, y, w, h]``, compressed-RLE ``segmentation``, ``area``, ``keypoints``,
    ``num_keypoints``; categories with keypoint names and skeleton) and ``refs(shapes).p`` (one
    ref per object with up to ``sentences_per_ref`` phrasings of a unique expression, split
    ``refs_split`` or the dataset's split).

    Returns ``{"root", "image_dir", "instances", "refs"}``.
    """
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    split = refs_split or dataset.split
    images, annotations, refs = [], [], []
    ann_id = 1
    for index in range(n):
        scene = dataset.scene(index)
        h, w = scene.size
        file_name = f"{index:06d}.png"
        Image.fromarray(np.ascontiguousarray(scene.image.transpose(1, 2, 0))).save(image_dir / file_name)
        image_id = index + 1  # COCO ids start at 1
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        rng = np.random.default_rng([dataset.seed, 7, index])
        for i, o in enumerate(scene.objects):
            rle = mask_utils.encode(np.asfortranarray(scene.mask(i).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in o.box)
            kp = o.keypoints.copy()
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": o.category + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(o.area),
                    "segmentation": rle,
                    "iscrowd": 0,
                    "keypoints": [round(float(v), 3) for v in kp.reshape(-1)],
                    "num_keypoints": int((kp[:, 2] > 0).sum()),
                    "attributes": {"colour": o.colour_name, "size": o.size_name},
                }
            )
            ref = choose_reference(i, scene, rng)
            if ref is not None:
                texts = list(dict.fromkeys(render(ref, rng) for _ in range(sentences_per_ref)))
                sents = [
                    {"sent_id": ann_id * 10 + k, "sent": t, "raw": t, "tokens": t.split()}
                    for k, t in enumerate(texts)
                ]
                refs.append(
                    {
                        "ref_id": ann_id,
                        "ann_id": ann_id,
                        "image_id": image_id,
                        "category_id": o.category + 1,
                        "split": split,
                        "file_name": file_name,
                        "sentences": sents,
                        "sent_ids": [s["sent_id"] for s in sents],
                    }
                )
            ann_id += 1
    instances = out / "annotations" / "instances.json"
    with open(instances, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": SHAPES_CATEGORIES}, f)
    refs_path = out / "refs(shapes).p"
    with open(refs_path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return {"root": out, "image_dir": image_dir, "instances": instances, "refs": refs_path}
