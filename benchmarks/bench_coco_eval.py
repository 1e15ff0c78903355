"""Time COCO bbox evaluation of many images through vlzoo's ``DetectionMAP`` (update in batches,
then compute) against building the COCO dicts and calling faster_coco_eval's ``COCOeval_faster``
directly, and pycocotools' ``COCOeval`` directly, on the same tensors; print the times, the ratios
and the largest difference between the 12 summary figures.

    OMP_NUM_THREADS=1 python benchmarks/bench_coco_eval.py --images 5000 --detections 100
    OMP_NUM_THREADS=1 python benchmarks/bench_coco_eval.py --iou-type segm --images 500 --detections 20 --scale 0.25
    OMP_NUM_THREADS=1 python benchmarks/bench_coco_eval.py --iou-type keypoints --images 5000 --detections 20

``segm`` adds masks (each box with a bite out of a corner) and ``keypoints`` 17 keypoints per object
(detections: the first 20 per image, noisy copies of an object's keypoints or random ones).
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
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlzoo.evaluation import COCO_MAP_KEYS, KEYPOINT_KEYS, DetectionMAP, KeypointAP
from vlzoo.structures import Predictions, Targets


def make_samples(
    *, images: int, detections: int, categories: int, seed: int, scale: float = 1.0
) -> tuple[list[Predictions], list[Targets]]:
    """Random images (640 x 480 times ``scale``) with 1-15 objects and exactly ``detections`` scored
    boxes each: noisy copies of the objects plus random boxes.  Coordinates on a 1/8-pixel grid; 10% of
    objects crowd."""
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
        gt, boxes = np.round(gt * scale * 8) / 8, np.round(boxes * scale * 8) / 8
        size = (round(480 * scale), round(640 * scale))
        det_labels = np.where(rng.random(detections) < 0.8, labels[src], rng.integers(1, categories + 1, detections))
        targets.append(Targets(
            boxes=torch.tensor(gt, dtype=torch.float32), labels=torch.from_numpy(labels),
            iscrowd=torch.from_numpy(rng.random(n) < 0.1), image_id=i, image_size=size,
        ))
        preds.append(Predictions(
            boxes=torch.tensor(boxes, dtype=torch.float32),
            scores=torch.from_numpy(rng.random(detections).astype(np.float32)),
            labels=torch.from_numpy(det_labels), image_id=i, image_size=size,
        ))
    return preds, targets


def box_masks(boxes: torch.Tensor, size: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
    """Boolean masks of the boxes with a rectangular bite out of one corner (not boxes)."""
    h, w = size
    masks = np.zeros((boxes.shape[0], h, w), dtype=bool)
    for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[j, y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = True
        bw, bh = int(rng.integers(0, max(1, (x1 - x0) // 2 + 1))), int(rng.integers(0, max(1, (y1 - y0) // 2 + 1)))
        masks[j, y0 : y0 + bh, x0 : x0 + bw] = False
    return torch.from_numpy(masks)


def with_masks(preds: list[Predictions], targets: list[Targets], seed: int) -> tuple[list[Predictions], list[Targets]]:
    rng = np.random.default_rng(seed + 1)
    return ([p.replace(masks=box_masks(p.boxes, p.image_size, rng)) for p in preds],
            [t.replace(masks=box_masks(t.boxes, t.image_size, rng)) for t in targets])


def with_keypoints(preds: list[Predictions], targets: list[Targets], seed: int, k: int = 17
                   ) -> tuple[list[Predictions], list[Targets]]:
    """Person keypoints inside each object box (30% unlabelled); detections keep the first 20 boxes'
    keypoints: noisy copies of an object's keypoints or random ones (one category)."""
    rng = np.random.default_rng(seed + 2)
    out_p, out_t = [], []
    for p, t in zip(preds, targets, strict=True):
        b = t.boxes.double().numpy()
        u = rng.random((b.shape[0], k, 2))
        kp = np.concatenate([b[:, None, :2] + u * (b[:, None, 2:] - b[:, None, :2]),
                             rng.choice([0.0, 1.0, 2.0], size=(b.shape[0], k, 1), p=[0.3, 0.2, 0.5])], axis=2)
        m = min(20, len(p))
        src = rng.integers(0, b.shape[0], size=m)
        scale = np.sqrt((b[src, 2] - b[src, 0]) * (b[src, 3] - b[src, 1]))[:, None, None]
        noisy = kp[src, :, :2] + rng.normal(0, 1, size=(m, k, 2)) * rng.uniform(0, 0.15, size=(m, 1, 1)) * scale
        random_kp = rng.uniform(0, 500, size=(m, k, 2))
        dkp = np.where((rng.random(m) < 0.5)[:, None, None], random_kp, noisy)
        dkp = np.concatenate([dkp, rng.random((m, k, 1))], axis=2)
        out_t.append(t.replace(keypoints=torch.from_numpy(kp), labels=torch.ones(b.shape[0], dtype=torch.long)))
        out_p.append(Predictions(keypoints=torch.from_numpy(dkp), scores=p.scores[:m].double(),
                                 labels=torch.ones(m, dtype=torch.long), image_id=p.image_id, image_size=p.image_size))
    return out_p, out_t


def run_vlzoo(preds: list[Predictions], targets: list[Targets], batch: int, iou_type: str) -> np.ndarray:
    """Update the metric batch by batch, as a validation loop would, then compute."""
    metric = KeypointAP() if iou_type == "keypoints" else DetectionMAP(iou_type=iou_type)
    keys = KEYPOINT_KEYS if iou_type == "keypoints" else COCO_MAP_KEYS
    for start in range(0, len(preds), batch):
        metric.update(preds[start : start + batch], targets[start : start + batch])
    out = metric.compute()
    return np.array([float(out[k]) for k in keys])


def coco_dicts(preds: list[Predictions], targets: list[Targets], iou_type: str) -> tuple[dict, list[dict]]:
    """COCO ground truth and result records from the same tensors, as a user calling a COCO
    library directly would write them: one image per sample; results in COCO's result format
    (``bbox`` in ``xywh``; a per-mask RLE ``segmentation``; flat ``keypoints``)."""
    images, anns, results, cats = [], [], [], set()
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        images.append({"id": i, "height": t.image_size[0], "width": t.image_size[1]})
        for j, (box, label, crowd) in enumerate(zip(t.boxes.double().tolist(), t.labels.tolist(), t.iscrowd.tolist(),
                                                    strict=True)):
            x0, y0, x1, y1 = box
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": label, "iscrowd": int(crowd),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)}
            if iou_type == "segm":
                ann["segmentation"] = mask_utils.encode(np.asfortranarray(t.masks[j].numpy().astype(np.uint8)))
                ann["area"] = float(mask_utils.area(ann["segmentation"]))
            elif iou_type == "keypoints":
                ann["keypoints"] = t.keypoints[j].reshape(-1).tolist()
                ann["num_keypoints"] = int((t.keypoints[j][:, 2] > 0).sum())
            anns.append(ann)
            cats.add(label)
        for j, (score, label) in enumerate(zip(p.scores.tolist(), p.labels.tolist(), strict=True)):
            result = {"image_id": i, "category_id": label, "score": score}
            if iou_type == "segm":
                result["segmentation"] = mask_utils.encode(np.asfortranarray(p.masks[j].numpy().astype(np.uint8)))
            elif iou_type == "keypoints":
                result["keypoints"] = p.keypoints[j].reshape(-1).tolist()
            else:
                x0, y0, x1, y1 = p.boxes[j].double().tolist()
                result["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            results.append(result)
            cats.add(label)
    gt = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
    return gt, results


def run_library(preds: list[Predictions], targets: list[Targets], library: str, iou_type: str) -> np.ndarray:
    """Build the COCO dicts and run ``library``'s COCOeval (pycocotools, or faster_coco_eval's
    ``COCOeval_faster``) on them: ``COCO`` -> ``loadRes`` -> evaluate / accumulate / summarize."""
    gt, results = coco_dicts(preds, targets, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        if library == "pycocotools":
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
        else:
            fast_gt = FastCOCO(gt)
            # one thread, like vlzoo's metric and pycocotools
            evaluator = COCOeval_faster(fast_gt, fast_gt.loadRes(results), iouType=iou_type, rle_iou_max_workers=1)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)[: 10 if iou_type == "keypoints" else 12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="samples per update() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="timed rounds; the best of each is reported")
    parser.add_argument("--iou-type", choices=["bbox", "segm", "keypoints"], default="bbox")
    parser.add_argument("--scale", type=float, default=1.0, help="image size relative to 640 x 480")
    args = parser.parse_args()

    kind = args.iou_type
    preds, targets = make_samples(images=args.images, detections=args.detections, categories=args.categories,
                                  seed=args.seed, scale=args.scale)
    if kind == "segm":
        preds, targets = with_masks(preds, targets, args.seed)
    elif kind == "keypoints":
        preds, targets = with_keypoints(preds, targets, args.seed)
    dets = sum(p.scores.numel() for p in preds)
    print(f"{kind}: {args.images} images ({targets[0].image_size[1]} x {targets[0].image_size[0]}), {dets} detections, "
          f"{sum(len(t) for t in targets)} objects, torch threads {torch.get_num_threads()}")
    metric_name = "vlzoo KeypointAP" if kind == "keypoints" else "vlzoo DetectionMAP"
    runs = {
        metric_name: lambda: run_vlzoo(preds, targets, args.batch, kind),
        "faster_coco_eval direct": lambda: run_library(preds, targets, "faster_coco_eval", kind),
        "pycocotools direct": lambda: run_library(preds, targets, "pycocotools", kind),
    }
    # warm-up on a few images (imports, first-call costs of the C++ extensions), not timed
    run_vlzoo(preds[:20], targets[:20], args.batch, kind)
    run_library(preds[:20], targets[:20], "faster_coco_eval", kind)
    run_library(preds[:20], targets[:20], "pycocotools", kind)
    times: dict[str, list[float]] = {name: [] for name in runs}
    figures: dict[str, np.ndarray] = {}
    for _ in range(args.repeat):  # interleaved, so that load changes hit every contender alike
        for name, run in runs.items():
            tic = time.perf_counter()
            figures[name] = run()
            times[name].append(time.perf_counter() - tic)
    best = {name: min(t) for name, t in times.items()}
    for name in runs:
        print(f"{name:26s} {best[name]:8.2f} s   AP={figures[name][0]:.6f} AP50={figures[name][1]:.6f}")
    ours, fast, ref = best[metric_name], best["faster_coco_eval direct"], best["pycocotools direct"]
    print(f"vlzoo / faster_coco_eval direct: {ours / fast:.2f}x the time;  pycocotools / vlzoo: {ref / ours:.2f}x;  "
          f"pycocotools / faster_coco_eval: {ref / fast:.2f}x")
    diff = max(np.abs(figures[metric_name] - figures[k]).max() for k in runs)
    print(f"max |difference| over the {len(figures[metric_name])} figures: {diff:.2e} "
          f"({'identical' if diff <= 1e-6 else 'DIFFERENT'} at 1e-6)")


if __name__ == "__main__":
    main()
