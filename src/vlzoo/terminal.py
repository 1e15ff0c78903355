"""What vlzoo prints on the terminal: a table per evaluation, a line per validation, and not the
third-party messages a vlzoo user cannot act on.

**One column per split.**

Lightning prints a table with one column per dataloader, but a metric logged when the
evaluation epoch ends (vlzoo computes each split's metrics there, once, across ranks) is listed
under every dataloader: a RefCOCO test with ``testA`` and ``testB`` would show both splits'
figures in both columns.  :func:`evaluation_table` keeps each split's figures in its own column
(the split is the first part of every metric name vlzoo logs: ``testA/rec/acc_0.5``).

**A line per validation.** Without a progress bar (no terminal, or ``CI`` set),
:class:`ValidationLine` prints the step and the primary metric each time ``fit`` validates.

**Quiet.** :func:`quiet_third_party` filters, each by its own text and where it arises, the
messages of vlzoo's dependencies that say nothing to act on: Lightning's ``LeafSpec``
deprecation (Lightning's own code on a newer torch) and its tip to install a cloud logger.
Everything else - every warning about the user's data, recipe or run - is shown as before.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["split_results", "evaluation_table", "ValidationLine", "PRIMARY_METRICS", "quiet_third_party"]

#: (warning text pattern, module pattern) of the third-party warnings :func:`quiet_third_party` filters
THIRD_PARTY_WARNINGS: tuple[tuple[str, str], ...] = (
    # lightning 2.6 checks isinstance(x, LeafSpec), which torch >= 2.9 deprecates: not the user's code
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
)
#: (logger, message start) of third-party log lines :func:`quiet_third_party` drops
THIRD_PARTY_LOG_LINES: tuple[tuple[str, str], ...] = (
    # Lightning's rank_zero_info goes through this logger; the tip is printed by every Trainer()
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
)


class _DropLines(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.start)


def quiet_third_party() -> None:
    """Filter :data:`THIRD_PARTY_WARNINGS` and :data:`THIRD_PARTY_LOG_LINES` (idempotent)."""
    for message, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name, start in THIRD_PARTY_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) and f.start == start for f in logger.filters):
            logger.addFilter(_DropLines(start))

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


#: the metric a validation line shows per task: the first of each task in the Evaluator's table
PRIMARY_METRICS: dict[str, str] = {
    "rec": "acc_0.5", "res": "ciou", "det": "map", "seg": "map", "pose": "ap",
    "reg": "bleu4", "caption": "bleu4", "vqa": "exact_match", "grec": "pr_f1_0.5", "gres": "giou",
}


class ValidationLine(Callback):
    """One line per validation during ``fit``: ``vlzoo: step 500: val/rec/acc_0.5 0.6120 (val/loss
    0.8812)`` - the primary metric of each task the run evaluates (:data:`PRIMARY_METRICS`, or
    the checkpoint's ``monitor`` when the recipe sets one) on the first validation split, and
    the validation losses; on rank 0 only.  :func:`vlzoo.build.build` adds it when there is no
    progress bar (stdout is not a terminal, or ``CI`` is set)."""

    def __init__(self, monitor: str | None = None) -> None:
        self.monitor = monitor

    def line(self, trainer: Any, pl_module: Any) -> str:
        metrics = trainer.callback_metrics
        names = list(getattr(trainer.datamodule, "val_names", None) or []) or ["val"]
        wanted = [self.monitor] if self.monitor else [
            f"{names[0]}/{task}/{PRIMARY_METRICS[task]}" for task in getattr(pl_module, "tasks", ())
            if task in PRIMARY_METRICS]
        shown = [f"{k} {float(metrics[k]):.4f}" for k in wanted if k in metrics]
        losses = [f"{k} {float(metrics[k]):.4f}" for k in sorted(metrics)
                  if k.endswith("/loss") and k.split("/")[0] in names]
        text = " ".join(shown)
        if losses:
            text = f"{text} ({', '.join(losses)})" if text else ", ".join(losses)
        return f"vlzoo: step {trainer.global_step}: {text or 'validated'}"

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        print(self.line(trainer, pl_module), flush=True)
