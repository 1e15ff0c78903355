"""Running faster_coco_eval's ``COCOeval`` on COCO datasets built in memory.

The COCO metrics build their ground-truth and result datasets themselves, with every field
(``area``, ``bbox``, ``iscrowd``) already set, so the result side is indexed directly instead of
going through ``COCO.loadRes`` (which would recompute ``area`` by its own per-file rule; the
values vlzoo sets are the ones ``loadRes`` computes on vlzoo's COCO result files, see
docs/evaluation.md).
"""

from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

__all__ = ["coco_summary", "paused_gc"]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building and scoring COCO datasets.

    The datasets are hundreds of thousands of small dicts and lists that hold no reference cycles;
    every few hundred allocations the collector would otherwise walk all of them again (about half
    of the Python-side time).  The previous state is restored on exit.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _silent(*args: Any, **kwargs: Any) -> None:
    """A print function that prints nothing (COCO / COCOeval log their progress)."""


def _indexed(dataset: dict[str, Any]) -> COCO:
    coco = COCO(print_function=_silent)
    coco.dataset = dataset
    coco.createIndex()
    return coco


def coco_summary(
    gt: dict[str, Any],
    dt: dict[str, Any],
    *,
    iou_type: str,
    count: int,
    iou_thresholds: Sequence[float] | None = None,
    rec_thresholds: Sequence[float] | None = None,
    max_dets: Sequence[int] | None = None,
    kpt_oks_sigmas: Sequence[float] | None = None,
) -> np.ndarray:
    """The first ``count`` ``COCOeval.stats`` of ``dt`` scored against ``gt`` (float64).

    ``gt`` and ``dt`` are complete COCO datasets (``images``, ``annotations``, ``categories``);
    ``dt`` annotations carry ``score``, ``area`` and ``iscrowd = 0``.  Threshold arguments default
    to pycocotools' own ``Params``.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval_faster(
            _indexed(gt), _indexed(dt), iouType=iou_type, print_function=_silent,
            kpt_oks_sigmas=None if kpt_oks_sigmas is None else list(kpt_oks_sigmas),
            # one thread: the evaluation runs inside a training process that already uses the cores
            rle_iou_max_workers=1,
        )
        if iou_thresholds is not None:
            evaluator.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        if rec_thresholds is not None:
            evaluator.params.recThrs = np.asarray(rec_thresholds, dtype=np.float64)
        if max_dets is not None:
            evaluator.params.maxDets = [int(m) for m in max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=np.float64)[:count]
