"""Randomized evaluation inputs (fixed seeds) and pycocotools / numpy reference computations shared by
the evaluation tests and the distributed worker."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlzoo.evaluation.keypoints import COCO_PERSON_SIGMAS
from vlzoo.structures import Predictions, Targets

Q = 8.0  # boxes live on a 1/8-pixel grid: exactly representable, so xyxy->xywh is exact everywhere


def _box(rng: np.random.Generator, h: int, w: int) -> list[float]:
    x0 = rng.uniform(0, w - 8)
    y0 = rng.uniform(0, h - 8)
    bw = rng.uniform(2, min(w - x0, 180))
    bh = rng.uniform(2, min(h - y0, 180))
    return [round(v * Q) / Q for v in (x0, y0, x0 + bw, y0 + bh)]


def _jitter(rng: np.random.Generator, box: list[float], scale: float, h: int, w: int) -> list[float]:
    bw, bh = box[2] - box[0], box[3] - box[1]
    out = [box[0] + rng.normal(0, scale) * bw, box[1] + rng.normal(0, scale) * bh,
           box[2] + rng.normal(0, scale) * bw, box[3] + rng.normal(0, scale) * bh]
    x0, x1 = sorted((min(max(out[0], 0), w), min(max(out[2], 0), w)))
    y0, y1 = sorted((min(max(out[1], 0), h), min(max(out[3], 0), h)))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    return [round(v * Q) / Q for v in (x0, y0, x1, y1)]


def _box_mask(box: list[float], h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = True
    # carve an ellipse-ish hole so masks are not boxes
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = rng.uniform(x0, x1 + 1), rng.uniform(y0, y1 + 1)
    r = max(1.0, 0.3 * min(x1 - x0, y1 - y0))
    m &= ~(((xx - cx) ** 2 + (yy - cy) ** 2) < r**2)
    return m


def detection_samples(seed: int, n: int, *, segm: bool = False, categories: int = 3,
                      size: tuple[int, int] = (240, 320)) -> tuple[list[Predictions], list[Targets]]:
    """Random detection samples with crowd regions, samples without ground truth and samples without
    detections."""
    rng = np.random.default_rng(seed)
    h, w = size
    preds, targets = [], []
    for i in range(n):
        kind = i % 7
        ng = 0 if kind == 0 else int(rng.integers(1, 6))
        gboxes = [_box(rng, h, w) for _ in range(ng)]
        glabels = rng.integers(1, categories + 1, size=ng)
        crowd = (rng.random(ng) < 0.15).astype(np.int64)
        gmasks = np.stack([_box_mask(b, h, w, rng) for b in gboxes]) if ng else np.zeros((0, h, w), bool)
        dboxes, dlabels = [], []
        if kind != 1:  # kind 1: no detections
            for b, lab in zip(gboxes, glabels, strict=True):
                for _ in range(int(rng.integers(0, 3))):
                    dboxes.append(_jitter(rng, b, rng.uniform(0.0, 0.25), h, w))
                    dlabels.append(int(lab) if rng.random() < 0.9 else int(rng.integers(1, categories + 1)))
            for _ in range(int(rng.integers(0, 4))):
                dboxes.append(_box(rng, h, w))
                dlabels.append(int(rng.integers(1, categories + 1)))
        nd = len(dboxes)
        dmasks = np.stack([_box_mask(b, h, w, rng) for b in dboxes]) if nd else np.zeros((0, h, w), bool)
        scores = torch.from_numpy(rng.random(nd).astype(np.float32))
        targets.append(Targets(
            boxes=torch.tensor(gboxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.from_numpy(glabels.astype(np.int64)),
            masks=torch.from_numpy(gmasks) if segm else None,
            iscrowd=torch.from_numpy(crowd).bool(),
            image_id=1000 + i, image_size=(h, w),
        ))
        preds.append(Predictions(
            boxes=torch.tensor(dboxes, dtype=torch.float32).reshape(-1, 4),
            scores=scores, labels=torch.tensor(dlabels, dtype=torch.long),
            masks=torch.from_numpy(dmasks) if segm else None,
            image_id=1000 + i, image_size=(h, w),
        ))
    return preds, targets


def _evaluate(gt: dict, results: list[dict], iou_type: str, sigmas: list[float] | None = None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


def pycocotools_detection(preds: list[Predictions], targets: list[Targets], *, segm: bool) -> np.ndarray:
    """COCOeval stats (12) computed by pycocotools directly; every sample is one image."""
    images, anns, results, cats = [], [], [], set()
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        images.append({"id": i, "height": t.image_size[0], "width": t.image_size[1]})
        for j in range(len(t)):
            x0, y0, x1, y1 = t.boxes[j].double().tolist()
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": int(t.labels[j]),
                   "iscrowd": int(t.iscrowd[j]), "bbox": [x0, y0, x1 - x0, y1 - y0]}
            if segm:
                rle = mask_utils.encode(np.asfortranarray(t.masks[j].numpy().astype(np.uint8)))
                ann["segmentation"] = rle
                ann["area"] = float(mask_utils.area(rle))
            else:
                ann["area"] = (x1 - x0) * (y1 - y0)
            anns.append(ann)
            cats.add(int(t.labels[j]))
        for j in range(len(p)):
            cats.add(int(p.labels[j]))
            res = {"image_id": i, "category_id": int(p.labels[j]), "score": float(p.scores[j])}
            if segm:
                res["segmentation"] = mask_utils.encode(np.asfortranarray(p.masks[j].numpy().astype(np.uint8)))
            else:
                x0, y0, x1, y1 = p.boxes[j].double().tolist()
                res["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            results.append(res)
    gt = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
    return _evaluate(gt, results, "segm" if segm else "bbox")


def pose_samples(seed: int, n: int, *, k: int = 17, with_areas: bool = True) -> tuple[list[Predictions], list[Targets]]:
    """Random person keypoints: crowd instances, instances with no labelled keypoint, samples without
    ground truth and samples without detections."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(n):
        kind = i % 6
        ng = 0 if kind == 0 else int(rng.integers(1, 5))
        kps, boxes, areas = [], [], []
        for _ in range(ng):
            x0, y0 = rng.uniform(0, 300), rng.uniform(0, 300)
            bw, bh = rng.uniform(20, 220), rng.uniform(20, 220)
            kp = np.stack([rng.uniform(x0, x0 + bw, k), rng.uniform(y0, y0 + bh, k),
                           rng.choice([0, 1, 2], size=k, p=[0.3, 0.2, 0.5])], axis=1)
            if rng.random() < 0.1:
                kp[:, 2] = 0
            kps.append(kp)
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            areas.append(bw * bh * rng.uniform(0.5, 0.9))
        crowd = (rng.random(ng) < 0.15)
        dkps = []
        if kind != 1:
            for kp, area in zip(kps, areas, strict=True):
                for _ in range(int(rng.integers(0, 3))):
                    noise = rng.normal(0, rng.uniform(0, 0.12) * np.sqrt(area), size=(k, 2))
                    d = kp.copy()
                    d[:, :2] += noise
                    d[:, 2] = rng.random(k)
                    dkps.append(d)
            for _ in range(int(rng.integers(0, 3))):
                x0, y0 = rng.uniform(0, 300), rng.uniform(0, 300)
                dkps.append(np.stack([rng.uniform(x0, x0 + 100, k), rng.uniform(y0, y0 + 100, k),
                                      rng.random(k)], axis=1))
        nd = len(dkps)
        targets.append(Targets(
            boxes=torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
            labels=torch.ones(ng, dtype=torch.long),
            keypoints=torch.tensor(np.array(kps), dtype=torch.float64).reshape(ng, k, 3),
            iscrowd=torch.from_numpy(crowd),
            areas=torch.tensor(areas, dtype=torch.float64) if with_areas else None,
            image_id=2000 + i, image_size=(600, 600),
        ))
        preds.append(Predictions(
            keypoints=torch.tensor(np.array(dkps), dtype=torch.float64).reshape(nd, k, 3),
            scores=torch.from_numpy(rng.random(nd)),
            labels=torch.ones(nd, dtype=torch.long),
            image_id=2000 + i, image_size=(600, 600),
        ))
    return preds, targets


def pycocotools_keypoints(preds: list[Predictions], targets: list[Targets],
                          sigmas: list[float] | None = None) -> np.ndarray:
    """COCOeval(iouType="keypoints") stats (10) by pycocotools directly (results via loadRes)."""
    images, anns, results = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        images.append({"id": i + 1})
        kps = t.keypoints
        for j in range(kps.shape[0]):
            x0, y0, x1, y1 = t.boxes[j].tolist()
            area = float(t.areas[j]) if t.areas is not None else (x1 - x0) * (y1 - y0)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1,
                         "keypoints": kps[j].reshape(-1).tolist(), "num_keypoints": int((kps[j][:, 2] > 0).sum()),
                         "area": area, "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(t.iscrowd[j])})
        for j in range(p.keypoints.shape[0]):
            results.append({"image_id": i + 1, "category_id": 1, "keypoints": p.keypoints[j].reshape(-1).tolist(),
                            "score": float(p.scores[j])})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    return _evaluate(gt, results, "keypoints", list(sigmas) if sigmas is not None else list(COCO_PERSON_SIGMAS))


def rec_samples(seed: int, n: int) -> tuple[list[Predictions], list[Targets]]:
    """REC samples: several scored boxes, unparsed answers, answers without a box, NaN boxes."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(n):
        gt = _box(rng, 200, 300)
        kind = i % 9
        m = int(rng.integers(1, 4))
        boxes = [_jitter(rng, gt, rng.uniform(0, 0.3), 200, 300) if rng.random() < 0.8 else _box(rng, 200, 300)
                 for _ in range(m)]
        scores = rng.random(m).astype(np.float32) if kind % 2 else np.zeros(0, np.float32)
        boxes_t = torch.tensor(boxes, dtype=torch.float32)
        if kind == 3:
            boxes_t = torch.zeros((0, 4))
            scores = np.zeros(0, np.float32)
        if kind == 5:
            boxes_t[int(np.argmax(scores))] = float("nan")
        preds.append(Predictions(boxes=boxes_t, scores=torch.from_numpy(scores), parsed=kind != 7,
                                 image_id=i))
        targets.append(Targets(boxes=torch.tensor([gt]), image_id=i, image_size=(200, 300)))
    return preds, targets


def numpy_rec(preds: list[Predictions], targets: list[Targets], thresholds=(0.5, 0.75, 0.9)) -> dict[str, float]:
    """Direct numpy REC accuracy and mean IoU."""
    ious = []
    for p, t in zip(preds, targets, strict=True):
        b = p.boxes.numpy().astype(np.float64)
        if not p.parsed or b.shape[0] == 0:
            ious.append(0.0)
            continue
        s = p.scores.numpy()
        a = b[int(np.argmax(s))] if s.size == b.shape[0] else b[0]
        g = t.boxes[0].numpy().astype(np.float64)
        if not np.isfinite(a).all():
            ious.append(0.0)
            continue
        iw = max(0.0, min(a[2], g[2]) - max(a[0], g[0]))
        ih = max(0.0, min(a[3], g[3]) - max(a[1], g[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
        ious.append(inter / union if union > 0 else 0.0)
    ious = np.array(ious)
    out = {f"acc_{t:g}": float((ious >= t).mean()) for t in thresholds}
    out["miou"] = float(ious.mean())
    return out


def res_samples(seed: int, n: int) -> tuple[list[Predictions], list[Targets]]:
    """RES samples: multi-instance predictions, empty predictions, unparsed ones, varying sizes."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(n):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        gt = _box_mask(_box(rng, h + 40, w + 40), h + 40, w + 40, rng)[:h, :w]
        if i % 11 == 4:
            gt[:] = False  # no-object target
        ng = int(rng.integers(0, 3))
        pm = np.stack([rng.random((h, w)) < rng.uniform(0.05, 0.6) for _ in range(ng)]) if ng else np.zeros((0, h, w), bool)
        if ng and rng.random() < 0.5:
            pm[0] |= gt & (rng.random((h, w)) < 0.9)
        preds.append(Predictions(masks=torch.from_numpy(pm), parsed=i % 13 != 6, image_id=i, image_size=(h, w)))
        targets.append(Targets(masks=torch.from_numpy(gt[None]), image_id=i, image_size=(h, w)))
    return preds, targets


def numpy_res(preds: list[Predictions], targets: list[Targets], thresholds=(0.5, 0.6, 0.7, 0.8, 0.9)) -> dict[str, float]:
    """Direct numpy cIoU / gIoU / precision@t (LISA's definitions, exact division)."""
    inter_sum = union_sum = 0.0
    ious = []
    for p, t in zip(preds, targets, strict=True):
        g = t.masks.numpy().any(axis=0)
        if p.parsed and p.masks is not None and p.masks.shape[0]:
            m = p.masks.numpy().any(axis=0)
        else:
            m = np.zeros_like(g)
        inter, union = float(np.logical_and(m, g).sum()), float(np.logical_or(m, g).sum())
        inter_sum += inter
        union_sum += union
        ious.append(inter / union if union > 0 else 1.0)
    ious = np.array(ious)
    out = {"ciou": inter_sum / union_sum, "giou": float(ious.mean())}
    out.update({f"prec_{t:g}": float((ious >= t).mean()) for t in thresholds})
    return out


WORDS = "a the man woman dog cat red blue small big riding holding left right on in near table horse".split()


def caption_samples(seed: int, n: int) -> tuple[list[Predictions], list[Targets]]:
    """Captions with multiple references, punctuation/case noise and unparsed answers."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(n):
        refs = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(int(rng.integers(1, 4)))]
        hyp_words = refs[0].split()
        hyp_words = [wd if rng.random() < 0.7 else str(rng.choice(WORDS)) for wd in hyp_words]
        hyp = " ".join(hyp_words).capitalize() + "."
        preds.append(Predictions(text=hyp, parsed=i % 8 != 3, image_id=i))
        targets.append(Targets(captions=refs, text=refs[0], image_id=i))
    return preds, targets


# --- every shape of record, and pycocotools on vlzoo's own COCO result files ----------------------
def varied_detection_samples(seed: int, n: int, *, segm: bool) -> tuple[list[Predictions], list[Targets]]:
    """:func:`detection_samples` plus every shape of prediction the exporter and the metric must agree
    on: unparsed answers, predictions without scores (ranked in output order), predictions labelled
    with the one category of a single-category target (a per-category prompt), NaN boxes, masks with ``mask_scores`` only, empty masks, predicted
    boxes that are not the mask's box, and target ``areas`` given for some samples."""
    preds, targets = detection_samples(seed, n, segm=segm)
    rng = np.random.default_rng(seed + 100)
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        kind = i % 9
        if kind == 2:
            preds[i] = p.replace(parsed=False)
        elif kind == 3:
            preds[i] = p.replace(scores=torch.zeros(0))
        elif kind == 4 and len(t):
            label = int(t.labels[0])
            targets[i] = t.replace(labels=torch.full_like(t.labels, label))
            preds[i] = p.replace(labels=torch.full((len(p.labels),), label, dtype=torch.long))
        elif kind == 5 and len(p) and not segm:
            boxes = p.boxes.clone()
            boxes[0, 1] = float("nan")
            preds[i] = p.replace(boxes=boxes)
        elif kind == 6 and segm and p.masks is not None and p.masks.shape[0]:
            masks = p.masks.clone()
            masks[0] = False  # an empty mask: area 0, a false positive
            preds[i] = p.replace(masks=masks, scores=torch.zeros(0), mask_scores=p.scores)
        elif kind == 7 and segm and len(p):
            # a box prediction unrelated to its mask: the mask area, not the box area, must bucket it
            preds[i] = p.replace(boxes=p.boxes[:, [0, 1, 0, 1]] + torch.tensor([0.0, 0.0, 300.0, 230.0]))
        elif kind == 8 and len(t):
            areas = torch.from_numpy(rng.uniform(10, 120, size=len(t)) ** 2).float()
            targets[i] = t.replace(areas=areas)
    return preds, targets


def varied_pose_samples(seed: int, n: int) -> tuple[list[Predictions], list[Targets]]:
    """:func:`pose_samples` plus predictions that carry person boxes much larger than their keypoint
    extent (as a detector's would; only the extent may bucket them), predictions without scores,
    unparsed ones, and targets without boxes or areas."""
    preds, targets = pose_samples(seed, n)
    rng = np.random.default_rng(seed + 200)
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        kind = i % 5
        kp = p.keypoints
        if kind in (0, 1, 4) and kp.shape[0]:
            lo = kp[:, :, :2].amin(1) - torch.from_numpy(rng.uniform(30, 120, size=(kp.shape[0], 2)))
            hi = kp[:, :, :2].amax(1) + torch.from_numpy(rng.uniform(30, 120, size=(kp.shape[0], 2)))
            preds[i] = p.replace(boxes=torch.cat([lo, hi], 1))
        if kind == 2:
            preds[i] = p.replace(scores=torch.zeros(0))
        elif kind == 3:
            preds[i] = p.replace(parsed=False)
        elif kind == 4:
            targets[i] = t.replace(boxes=torch.zeros((0, 4)), areas=None)
    return preds, targets


def _single_category(t: Targets) -> int | None:
    cats = torch.unique(t.labels)
    return int(cats[0]) if cats.numel() == 1 else None


def ground_truth_coco(targets: list[Targets], iou_type: str) -> dict:
    """A COCO ground-truth file for the targets, with the documented target conventions: ``area`` =
    ``Targets.areas`` where positive (all given areas for keypoints), else the box area (bbox), the mask
    area (segm) or the area of the box / labelled-keypoint extent (keypoints)."""
    images, anns, cats = [], [], set()
    for t in targets:
        images.append({"id": int(t.image_id), "height": int(t.image_size[0]), "width": int(t.image_size[1])})
        if iou_type == "keypoints":
            kps = t.keypoints.double()
            n = kps.shape[0]
        elif iou_type == "segm":
            n = t.masks.shape[0]
        else:
            n = len(t)
        for j in range(n):
            ann = {"id": len(anns) + 1, "image_id": int(t.image_id), "category_id": int(t.labels[j]) if len(t.labels) else 1,
                   "iscrowd": int(t.iscrowd[j]) if t.iscrowd is not None and t.iscrowd.numel() else 0}
            if iou_type == "keypoints":
                kp = kps[j]
                if len(t) == n:
                    x0, y0, x1, y1 = t.boxes[j].double().tolist()
                else:
                    lab = kp[kp[:, 2] > 0]
                    x0, y0, x1, y1 = ((lab[:, 0].min(), lab[:, 1].min(), lab[:, 0].max(), lab[:, 1].max())
                                      if lab.shape[0] else (0.0, 0.0, 0.0, 0.0))
                    x0, y0, x1, y1 = (float(v) for v in (x0, y0, x1, y1))
                ann.update(keypoints=kp.reshape(-1).tolist(), num_keypoints=int((kp[:, 2] > 0).sum()),
                           bbox=[x0, y0, x1 - x0, y1 - y0])
                given = t.areas is not None and t.areas.numel() == n
                ann["area"] = float(t.areas[j]) if given else (x1 - x0) * (y1 - y0)
            else:
                if iou_type == "segm":
                    rle = mask_utils.encode(np.asfortranarray(t.masks[j].numpy().astype(np.uint8)))
                    ann["segmentation"] = rle
                    ann["bbox"] = mask_utils.toBbox(rle).tolist()
                    area = float(mask_utils.area(rle))
                else:
                    x0, y0, x1, y1 = t.boxes[j].double().tolist()
                    ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
                    area = (x1 - x0) * (y1 - y0)
                given = float(t.areas[j]) if t.areas is not None else 0.0
                ann["area"] = given if given > 0 else area
            anns.append(ann)
            cats.add(ann["category_id"])
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in sorted(cats)]}


def pycocotools_on_exported(preds: list[Predictions], targets: list[Targets], iou_type: str,
                            sigmas: list[float] | None = None) -> np.ndarray:
    """pycocotools' ``loadRes`` + ``COCOeval`` on vlzoo's exported COCO result file (written to JSON
    text and read back, as a file) against :func:`ground_truth_coco`."""
    import json

    from vlzoo.predictions import coco_results

    records = [r for p, t in zip(preds, targets, strict=True)
               for r in coco_results(p, iou_type, category_id=_single_category(t))]
    records = json.loads(json.dumps(records))
    gt = ground_truth_coco(targets, iou_type)
    if iou_type == "keypoints" and sigmas is None:
        sigmas = list(COCO_PERSON_SIGMAS)
    return _evaluate(gt, records, iou_type, sigmas)
