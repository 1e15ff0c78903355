"""Time the REC and RES metrics on many samples: vlzoo's ``ReferringBoxAccuracy`` /
``ReferringSegmentation`` (update in batches, then compute) against a per-sample reference loop
written the plain way (one sample at a time in torch: pick the answer box, IoU; union the masks,
count); print the times, the ratio and the largest difference between the figures.

    OMP_NUM_THREADS=1 python benchmarks/bench_referring_eval.py --samples 100000

``--baseline path/to/referring.py`` also times another version's metrics on the same batches in the
same run (e.g. the per-sample implementation before vectorisation:
``git archive 37550d8 src | tar -x -C /tmp/before`` then ``--baseline
/tmp/before/src/vlzoo/evaluation/referring.py``).

Samples are generated batch by batch (not timed) so that 100,000 RES samples never sit in memory
at once: REC answers of 1-3 scored boxes (some unparsed, some without a box, some NaN); RES masks of
1-2 predicted instances against one target mask, image sides 24-96 px (same size within a batch
with ``--same-size``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Iterator

import numpy as np
import torch

from vlzoo.evaluation import ReferringBoxAccuracy, ReferringSegmentation
from vlzoo.structures import Predictions, Targets

REC_T = (0.5, 0.75, 0.9)
RES_T = (0.5, 0.6, 0.7, 0.8, 0.9)


def rec_batches(samples: int, batch: int, seed: int) -> Iterator[tuple[list[Predictions], list[Targets]]]:
    rng = np.random.default_rng(seed)
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        gt = np.sort(rng.uniform(0, 500, size=(n, 2, 2)), axis=1).reshape(n, 4)[:, [0, 2, 1, 3]]
        preds, targets = [], []
        for i in range(n):
            m = int(rng.integers(1, 4))
            boxes = gt[i] + rng.normal(0, 20, size=(m, 4))
            kind = (start + i) % 11
            p = Predictions(boxes=torch.from_numpy(boxes).float(), scores=torch.from_numpy(rng.random(m)).float(),
                            parsed=kind != 3, image_id=start + i)
            if kind == 5:
                p = p.replace(boxes=torch.zeros((0, 4)), scores=torch.zeros(0))
            elif kind == 7:
                b = p.boxes.clone()
                b[:, 0] = float("nan")
                p = p.replace(boxes=b)
            elif kind == 9:
                p = p.replace(scores=torch.zeros(0))
            preds.append(p)
            targets.append(Targets(boxes=torch.from_numpy(gt[i : i + 1]).float(), image_id=start + i))
        yield preds, targets


def res_batches(samples: int, batch: int, seed: int, same_size: bool) -> Iterator[tuple[list[Predictions], list[Targets]]]:
    rng = np.random.default_rng(seed)
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        preds, targets = [], []
        side = rng.integers(24, 97, size=2)
        for i in range(n):
            h, w = (int(v) for v in (side if same_size else rng.integers(24, 97, size=2)))
            gt = np.zeros((1, h, w), dtype=bool)
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            gt[0, y0 : y0 + int(rng.integers(4, h // 2)), x0 : x0 + int(rng.integers(4, w // 2))] = True
            m = int(rng.integers(1, 3))
            pm = np.roll(gt, int(rng.integers(-4, 5)), axis=2).repeat(m, 0)
            pm[1:] = rng.random((m - 1, h, w)) < 0.05
            kind = (start + i) % 13
            preds.append(Predictions(masks=torch.from_numpy(pm), parsed=kind != 6, image_id=start + i,
                                     image_size=(h, w)))
            targets.append(Targets(masks=torch.from_numpy(gt), image_id=start + i, image_size=(h, w)))
        yield preds, targets


def reference_rec(preds: list[Predictions], targets: list[Targets]) -> np.ndarray:
    """IoU of each sample's answer box, one sample at a time."""
    out = []
    for p, t in zip(preds, targets, strict=True):
        if not p.parsed or len(p) == 0:
            out.append(0.0)
            continue
        box = p.boxes[int(torch.argmax(p.scores))] if p.scores.numel() == len(p) else p.boxes[0]
        g = t.boxes[0].double()
        box = box.double()
        if not bool(torch.isfinite(box).all()):
            out.append(0.0)
            continue
        iw = (torch.minimum(box[2], g[2]) - torch.maximum(box[0], g[0])).clamp(min=0)
        ih = (torch.minimum(box[3], g[3]) - torch.maximum(box[1], g[1])).clamp(min=0)
        inter = iw * ih
        union = (box[2] - box[0]).clamp(min=0) * (box[3] - box[1]).clamp(min=0) + (g[2] - g[0]) * (g[3] - g[1]) - inter
        out.append(float(inter / union) if float(union) > 0 else 0.0)
    return np.array(out)


def reference_res(preds: list[Predictions], targets: list[Targets]) -> np.ndarray:
    """(intersection, union) of each sample's unioned masks, one sample at a time."""
    out = []
    for p, t in zip(preds, targets, strict=True):
        gt = t.masks.any(dim=0)
        pm = p.masks.any(dim=0) if p.parsed and p.masks is not None and p.masks.shape[0] else torch.zeros_like(gt)
        out.append((float((pm & gt).sum()), float((pm | gt).sum())))
    return np.array(out)


def rec_figures(ious: np.ndarray) -> np.ndarray:
    return np.array([*(float((ious >= t).mean()) for t in REC_T), float(ious.mean())])


def res_figures(iu: np.ndarray) -> np.ndarray:
    ious = np.where(iu[:, 1] > 0, iu[:, 0] / np.maximum(iu[:, 1], 1), 1.0)
    return np.array([iu[:, 0].sum() / iu[:, 1].sum(), ious.mean(), *(float((ious >= t).mean()) for t in RES_T)])


def run(name: str, batches, make_metric, reference, figures, keys, baseline=None) -> None:
    """Feed every batch to vlzoo's metric, the per-sample loop and (if given) a baseline metric of
    another vlzoo version, timing each on the same batches in turn."""
    t_ours = t_ref = t_base = 0.0
    parts = []
    count = 0
    metric = make_metric()
    base = baseline() if baseline is not None else None
    for index, (preds, targets) in enumerate(batches):
        # who reads a fresh batch first pays its cache misses: take turns
        contenders = ["ours", "ref", "base"] if base is not None else ["ours", "ref"]
        shift = index % len(contenders)
        for who in contenders[shift:] + contenders[:shift]:
            tic = time.perf_counter()
            if who == "ours":
                metric.update(preds, targets)
                t_ours += time.perf_counter() - tic
            elif who == "ref":
                parts.append(reference(preds, targets))
                t_ref += time.perf_counter() - tic
            else:
                base.update(preds, targets)
                t_base += time.perf_counter() - tic
        count += len(preds)
    tic = time.perf_counter()
    out = metric.compute()
    t_ours += time.perf_counter() - tic
    tic = time.perf_counter()
    ref = figures(np.concatenate(parts))
    t_ref += time.perf_counter() - tic
    ours = np.array([float(out[k]) for k in keys])
    print(f"{name}: {count} samples   vlzoo {t_ours:7.2f} s   per-sample loop {t_ref:7.2f} s   "
          f"loop / vlzoo {t_ref / t_ours:5.1f}x   max |difference| {np.abs(ours - ref).max():.1e}   "
          f"({', '.join(f'{k}={v:.4f}' for k, v in zip(keys, ours, strict=True))})")
    if base is not None:
        tic = time.perf_counter()
        theirs = base.compute()
        t_base += time.perf_counter() - tic
        diff = np.abs(ours - np.array([float(theirs[k]) for k in keys])).max()
        print(f"{name}: baseline {t_base:7.2f} s   baseline / vlzoo {t_base / t_ours:5.1f}x   "
              f"max |difference| {diff:.1e}")


def load_baseline(path: str):
    """The ``referring`` module of another vlzoo version (e.g. ``git archive <commit> src``)."""
    spec = importlib.util.spec_from_file_location("baseline_referring", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=64, help="samples per update() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--same-size", action="store_true", help="one mask size per RES batch")
    parser.add_argument("--baseline", help="a vlzoo/evaluation/referring.py of another version to time alongside")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, batches of {args.batch}")
    old = load_baseline(args.baseline) if args.baseline else None
    run("REC", rec_batches(args.samples, args.batch, args.seed), lambda: ReferringBoxAccuracy(thresholds=REC_T),
        reference_rec, rec_figures, [*(f"acc_{t:g}" for t in REC_T), "miou"],
        baseline=(lambda: old.ReferringBoxAccuracy(thresholds=REC_T)) if old else None)
    run("RES", res_batches(args.samples, args.batch, args.seed, args.same_size),
        lambda: ReferringSegmentation(thresholds=RES_T), reference_res, res_figures,
        ["ciou", "giou", *(f"prec_{t:g}" for t in RES_T)],
        baseline=(lambda: old.ReferringSegmentation(thresholds=RES_T)) if old else None)


if __name__ == "__main__":
    main()
