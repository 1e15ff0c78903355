"""What vlzoo prints on the terminal at the end of an evaluation: one column per split.

Lightning prints a table with one column per dataloader, but a metric logged when the
evaluation epoch ends (vlzoo computes each split's metrics there, once, across ranks) is listed
under every dataloader: a RefCOCO test with ``testA`` and ``testB`` would show both splits'
figures in both columns.  :func:`evaluation_table` keeps each split's figures in its own column
(the split is the first part of every metric name vlzoo logs: ``testA/rec/acc_0.5``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["split_results", "evaluation_table"]

_DATALOADER_SUFFIX = "/dataloader_idx_"


def _value(value: Any) -> float | None:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None


def split_results(results: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` from what ``Trainer.validate`` / ``Trainer.test`` return (one
    mapping per dataloader, in the order of ``names``).  A dataloader keeps the metrics of its
    own split (the split's name prefix is dropped) and those it logged itself
    (``/dataloader_idx_<i>``); a metric of another split is left out; a metric of no split is
    kept for every dataloader."""
    known = set(names)
    out: dict[str, dict[str, float]] = {}
    for index, (name, result) in enumerate(zip(names, results, strict=False)):
        own: dict[str, float] = {}
        for key, raw in result.items():
            value = _value(raw)
            if value is None:
                continue
            base, _, idx = key.partition(_DATALOADER_SUFFIX)
            if idx and idx != str(index):
                continue
            head, _, rest = base.partition("/")
            if head == name and rest:
                own[rest] = value
            elif head not in known:
                own[base] = value
        out[name] = own
    return out


def evaluation_table(results: Sequence[Mapping[str, Any]], names: Sequence[str], stage: str) -> str:
    """A plain-text table: one row per metric, one column per split (``" "`` where a split has
    no such metric)."""
    by_split = split_results(results, names)
    metrics = sorted({m for values in by_split.values() for m in values})
    if not metrics:
        return ""
    header = [f"{stage} metric", *by_split]
    rows = [[m, *(f"{v[m]:.6g}" if m in v else "" for v in by_split.values())] for m in metrics]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]
    rule = "-" * len(lines[0])
    return "\n".join([rule, lines[0], rule, *lines[1:], rule]) + "\n"
