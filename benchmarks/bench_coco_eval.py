"""Time COCO bbox evaluation of many images through vlzoo's ``DetectionMAP`` (update in batches,
then compute) against building the COCO dicts and calling faster_coco_eval's ``COCOeval_faster``
directly, and pycocotools' ``COCOeval`` directly, on the same tensors; print the times, the ratios
and the largest difference between the 12 summary figures.

    OMP_NUM_THREADS=1 python benchmarks/bench_coco_eval.py --images 5000 --detections 100
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import numpy as np
import torch
from faster_coco_eval import COCO as FastCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlzoo.evaluation import COCO_MAP_KEYS, DetectionMAP
from vlzoo.structures import Predictions, Targets


def make_samples(
    *, images: int, detections: int, categories: int, seed: int
) -> tuple[list[Predictions], list[Targets]]:
    """Random images (640 x 480) with 1-15 objects and exactly ``detections`` scored boxes each: noisy
    copies of the objects plus random boxes.  Coordinates on a 1/8-pixel grid; 10% of objects crowd."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(images):
        n = int(rng.integers(1, 16))
        xy = rng.uniform(0, [560, 400], size=(n, 2))
        wh = rng.uniform(4, 200, size=(n, 2))
        gt = np.round(np.concatenate([xy, np.minimum(xy + wh, [640, 480])], axis=1) * 8) / 8
        labels = rng.integers(1, categories + 1, size=n)
        src = rng.integers(0, n, size=detections)
        noisy = gt[src] + rng.normal(0, 1, size=(detections, 4)) * rng.uniform(0, 0.3, size=(detections, 1)) * (
            np.concatenate([wh[src], wh[src]], axis=1)
        )
        random_boxes = rng.uniform(0, [600, 440, 640, 480], size=(detections, 4))
        use_random = rng.random(detections) < 0.5
        boxes = np.where(use_random[:, None], random_boxes, noisy)
        boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:]) + 1],
                               axis=1)
        boxes = np.round(np.clip(boxes, 0, [640, 480, 640, 480]) * 8) / 8
        det_labels = np.where(rng.random(detections) < 0.8, labels[src], rng.integers(1, categories + 1, detections))
        targets.append(Targets(
            boxes=torch.tensor(gt, dtype=torch.float32), labels=torch.from_numpy(labels),
            iscrowd=torch.from_numpy(rng.random(n) < 0.1), image_id=i, image_size=(480, 640),
        ))
        preds.append(Predictions(
            boxes=torch.tensor(boxes, dtype=torch.float32),
            scores=torch.from_numpy(rng.random(detections).astype(np.float32)),
            labels=torch.from_numpy(det_labels), image_id=i, image_size=(480, 640),
        ))
    return preds, targets


def run_vlzoo(preds: list[Predictions], targets: list[Targets], batch: int) -> np.ndarray:
    """Update a DetectionMAP batch by batch, as a validation loop would, then compute."""
    metric = DetectionMAP(iou_type="bbox")
    for start in range(0, len(preds), batch):
        metric.update(preds[start : start + batch], targets[start : start + batch])
    out = metric.compute()
    return np.array([float(out[k]) for k in COCO_MAP_KEYS])


def coco_dicts(preds: list[Predictions], targets: list[Targets]) -> tuple[dict, list[dict]]:
    """COCO ground truth and result records from the same tensors, as a user calling a COCO
    library directly would write them (one image per sample, result ``bbox`` in ``xywh``)."""
    images, anns, results, cats = [], [], [], set()
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        images.append({"id": i, "height": t.image_size[0], "width": t.image_size[1]})
        for box, label, crowd in zip(t.boxes.double().tolist(), t.labels.tolist(), t.iscrowd.tolist(), strict=True):
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": label, "iscrowd": int(crowd),
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
            cats.add(label)
        for box, score, label in zip(p.boxes.double().tolist(), p.scores.tolist(), p.labels.tolist(), strict=True):
            x0, y0, x1, y1 = box
            results.append({"image_id": i, "category_id": label, "score": score, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            cats.add(label)
    gt = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
    return gt, results


def run_library(preds: list[Predictions], targets: list[Targets], library: str) -> np.ndarray:
    """Build the COCO dicts and run ``library``'s COCOeval (pycocotools, or faster_coco_eval's
    ``COCOeval_faster``) on them: ``COCO`` -> ``loadRes`` -> evaluate / accumulate / summarize."""
    gt, results = coco_dicts(preds, targets)
    with contextlib.redirect_stdout(io.StringIO()):
        if library == "pycocotools":
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        else:
            fast_gt = FastCOCO(gt)
            evaluator = COCOeval_faster(fast_gt, fast_gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="samples per update() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="timed rounds; the best of each is reported")
    args = parser.parse_args()

    preds, targets = make_samples(images=args.images, detections=args.detections, categories=args.categories,
                                  seed=args.seed)
    print(f"{args.images} images x {args.detections} detections, {sum(len(t) for t in targets)} objects, "
          f"torch threads {torch.get_num_threads()}")
    runs = {
        "vlzoo DetectionMAP": lambda: run_vlzoo(preds, targets, args.batch),
        "faster_coco_eval direct": lambda: run_library(preds, targets, "faster_coco_eval"),
        "pycocotools direct": lambda: run_library(preds, targets, "pycocotools"),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    figures: dict[str, np.ndarray] = {}
    for _ in range(args.repeat):  # interleaved, so that load changes hit every contender alike
        for name, run in runs.items():
            tic = time.perf_counter()
            figures[name] = run()
            times[name].append(time.perf_counter() - tic)
    best = {name: min(t) for name, t in times.items()}
    for name in runs:
        print(f"{name:26s} {best[name]:8.2f} s   map={figures[name][0]:.6f} map_50={figures[name][1]:.6f}")
    ours, fast, ref = best["vlzoo DetectionMAP"], best["faster_coco_eval direct"], best["pycocotools direct"]
    print(f"vlzoo / faster_coco_eval direct: {ours / fast:.2f}x the time;  pycocotools / vlzoo: {ref / ours:.2f}x")
    diff = max(np.abs(figures["vlzoo DetectionMAP"] - figures[k]).max() for k in runs)
    print(f"max |difference| over the 12 figures: {diff:.2e} ({'identical' if diff <= 1e-6 else 'DIFFERENT'} at 1e-6)")


if __name__ == "__main__":
    main()
