"""Write Shapes referring samples in gRefCOCO's and ReasonSeg's release formats.

The files are what :class:`~vlzoo.data.grefcoco.GRefCocoDataset` and
:class:`~vlzoo.data.reasonseg.ReasonSegDataset` read, so the same synthetic data exercises both
readers (the tests' round trips) and lets a user check a gRefCOCO / ReasonSeg pipeline on data
whose answer is known.  The referents of a sample are its ``meta["object_ids"]``: zero, one or
several objects are written as they are (a no-target sample as ``ann_id: [-1]`` / a JSON
without a target polygon).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from vlzoo.data.export import export_shapes_coco
from vlzoo.data.shapes.dataset import ShapesDataset
from vlzoo.data.shapes.language import render

__all__ = ["export_shapes_grefcoco", "export_shapes_reasonseg", "mask_to_polygons", "LONG_QUERY_TEMPLATE"]

#: the items exported: one referent (rec / res) or a referent set of any size (grec / gres)
_REFERRING = ("rec", "res", "grec", "gres")
#: how an exported long query (``is_sentence: true``) wraps a Shapes expression
LONG_QUERY_TEMPLATE = "there are several shapes in this picture; which of them is {expr}?"


def _referring_indices(dataset: ShapesDataset, n: int) -> list[int]:
    out = [i for i in range(n) if dataset.task_of(i) in _REFERRING]
    if not out:
        raise ValueError(
            f"the first {n} items of the ShapesDataset have no rec / res / grec / gres samples; export a dataset "
            "with one of those tasks"
        )
    return out


def _phrasings(sample, index: int, seed: int, count: int) -> list[str]:
    texts = [sample.targets.expressions[0]]
    ref = sample.meta.get("ref")
    if ref is not None and count > 1:
        rng = np.random.default_rng([seed, 11, index])
        texts += [render(ref, rng) for _ in range(4 * count)]
    return list(dict.fromkeys(texts))[: max(1, count)]


def export_shapes_grefcoco(
    dataset: ShapesDataset, out_dir: str | Path, *, num_images: int | None = None, split: str | None = None,
    phrasings: int = 2,
) -> dict[str, Path]:
    """gRefCOCO format: ``images/``, ``annotations/instances.json`` (every object of every scene,
    as :func:`~vlzoo.data.export.export_shapes_coco` writes them, with its ``refs(shapes).p``)
    and ``grefs(shapes).json``: one ref per rec / res / grec / gres item of the first ``num_images`` items,
    with ``ann_id`` the list of its referents' annotation ids (``[-1]`` and ``no_target: true``
    for none) and up to ``phrasings`` sentences.  Returns ``{"root", "image_dir", "instances",
    "grefs"}``."""
    out = Path(out_dir)
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    indices = _referring_indices(dataset, n)
    paths = export_shapes_coco(dataset, out, num_images=n, refs_split=split)
    with open(paths["instances"], encoding="utf-8") as f:
        instances = json.load(f)
    ann_ids: dict[int, list[int]] = {}
    for a in instances["annotations"]:  # written in scene-object order per image
        ann_ids.setdefault(a["image_id"], []).append(a["id"])
    cat_of = {a["id"]: a["category_id"] for a in instances["annotations"]}
    split = split or dataset.split
    refs = []
    next_sent = 1
    for index in indices:
        sample = dataset[index]
        image_id = index + 1
        ids = [ann_ids[image_id][k] for k in sample.meta["object_ids"]]
        texts = _phrasings(sample, index, dataset.seed, phrasings)
        sents = [{"sent_id": next_sent + k, "sent": t, "raw": t, "tokens": t.split()} for k, t in enumerate(texts)]
        next_sent += len(sents)
        refs.append({
            "ref_id": image_id,
            "image_id": image_id,
            "ann_id": ids or [-1],
            "category_id": [cat_of[a] for a in ids] or [-1],
            "no_target": not ids,
            "split": split,
            "file_name": f"{index:06d}.png",
            "sentences": sents,
            "sent_ids": [s["sent_id"] for s in sents],
        })
    grefs = out / "grefs(shapes).json"
    with open(grefs, "w", encoding="utf-8") as f:
        json.dump(refs, f)
    return {"root": out, "image_dir": paths["image_dir"], "instances": paths["instances"], "grefs": grefs}


def mask_to_polygons(mask: np.ndarray) -> list[list[list[float]]]:
    """An ``(H, W)`` bool mask as rectangle polygons along pixel edges, one per horizontal run of
    pixels: ``[[x0, y], [x1, y], [x1, y + 1], [x0, y + 1]]`` covers pixels ``x0 .. x1 - 1`` of row
    ``y``, and pycocotools rasterises each back to exactly those pixels."""
    polygons = []
    for y in range(mask.shape[0]):
        row = np.concatenate([[0], mask[y].astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(row))
        for x0, x1 in zip(edges[0::2], edges[1::2], strict=True):
            polygons.append([[float(x0), float(y)], [float(x1), float(y)], [float(x1), float(y + 1)],
                             [float(x0), float(y + 1)]])
    return polygons


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            src = mask[max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)]
            out[max(0, dy): h - max(0, -dy), max(0, dx): w - max(0, -dx)] |= src
    return out


def export_shapes_reasonseg(
    dataset: ShapesDataset, out_dir: str | Path, *, num_images: int | None = None, split: str | None = None,
    phrasings: int = 2, ignore_margin: int = 0, long_queries: bool = False,
) -> dict[str, Path]:
    """ReasonSeg format: ``<split>/<index:06d>.png`` and ``<split>/<index:06d>.json`` per rec / res / grec / gres
    item of the first ``num_images`` items.  The JSON's ``text`` holds up to ``phrasings``
    phrasings of the expression, ``shapes`` the referents' mask as ``target`` polygons
    (:func:`mask_to_polygons`) and, with ``ignore_margin`` > 0, the ring of pixels within that
    many pixels of the target (Chebyshev distance) as ``ignore`` polygons.  With
    ``long_queries``, every other example (odd index) is a long query (``is_sentence: true``,
    :data:`LONG_QUERY_TEMPLATE`).  Images are PNG (lossless) so a round trip is exact.  Returns
    ``{"root", "split_dir"}``."""
    out = Path(out_dir)
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    split_dir = out / (split or dataset.split)
    split_dir.mkdir(parents=True, exist_ok=True)
    for index in _referring_indices(dataset, n):
        sample = dataset[index]
        scene = dataset.scene(index)
        h, w = scene.size
        target = np.zeros((h, w), dtype=bool)
        for k in sample.meta["object_ids"]:
            target |= scene.owner == k
        is_sentence = bool(long_queries and index % 2 == 1)
        texts = _phrasings(sample, index, dataset.seed, phrasings)
        if is_sentence:
            texts = [LONG_QUERY_TEMPLATE.format(expr=t) for t in texts]
        shapes = [{"label": "target", "points": p, "group_id": None, "shape_type": "polygon", "flags": {}}
                  for p in mask_to_polygons(target)]
        if ignore_margin > 0 and target.any():
            ring = _dilate(target, int(ignore_margin)) & ~target
            shapes += [{"label": "ignore", "points": p, "group_id": None, "shape_type": "polygon", "flags": {}}
                       for p in mask_to_polygons(ring)]
        name = f"{index:06d}"
        Image.fromarray(np.ascontiguousarray(scene.image.transpose(1, 2, 0))).save(split_dir / f"{name}.png")
        record = {"text": texts, "is_sentence": is_sentence, "shapes": shapes, "imagePath": f"{name}.png",
                  "imageHeight": h, "imageWidth": w}
        with open(split_dir / f"{name}.json", "w", encoding="utf-8") as f:
            json.dump(record, f)
    return {"root": out, "split_dir": split_dir}
