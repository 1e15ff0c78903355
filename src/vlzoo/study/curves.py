"""Budget curves of a study: time-to-accuracy and accuracy against training compute.

Every cell logs its validation figures with the global step (Lightning's MLflow logger) and
``cost/cpu_seconds`` - the CPU seconds of the cell process since ``fit`` began - at the same
steps (:class:`~vlzoo.callbacks.CpuTimeCurve`).  From these histories alone:

* the time-to-accuracy table: per cell (mean curve over its seeds), the first validation step
  at which the primary figure reaches each threshold, and the CPU seconds spent by then, or
  ``> budget`` when it never does;
* a plot of the validation figure against CPU seconds, one line per paradigm and rung.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlzoo.callbacks import CPU_CURVE_KEY  # noqa: E402

__all__ = ["DEFAULT_THRESHOLDS", "mean_curve", "first_reaching", "value_at", "time_to_accuracy_rows", "plot_compute"]

#: Acc@0.5 / cIoU levels the time-to-accuracy table asks about (0.73: twice the random object on full Shapes)
DEFAULT_THRESHOLDS = (0.5, 0.73)
#: MLflow metric of a cell: CPU seconds of the cell process since ``fit`` began, logged at each
#: validation with the global step (by vlzoo.callbacks.CpuTimeCurve)
CPU_KEY = CPU_CURVE_KEY

Curve = list[tuple[int, float]]


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """The mean over seeds at the steps every curve has (curves of one schedule share them)."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    common = set.intersection(*({s for s, _ in c} for c in curves))
    out = []
    for step in sorted(common):
        values = [v for c in curves for s, v in c if s == step]
        out.append((step, sum(values) / len(values)))
    return out


def first_reaching(curve: Curve, threshold: float) -> int | None:
    """The first step whose value is >= ``threshold``, else ``None``."""
    for step, value in curve:
        if value >= threshold:
            return step
    return None


def value_at(curve: Curve, step: int) -> float | None:
    """The value at ``step``, linearly interpolated between the neighbouring points (``None``
    outside the curve)."""
    if not curve:
        return None
    points = sorted(curve)
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if s0 <= step <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return points[0][1] if points[0][0] == step else (points[-1][1] if points[-1][0] == step else None)


def time_to_accuracy_rows(
    groups: Sequence[tuple[str, Sequence[Curve], Sequence[Curve], float | None]],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> list[list[str]]:
    """Rows ``[label, steps budget, then per threshold "<steps> steps, <cpu> CPU s" | "> budget"]``.

    ``groups``: ``(label, validation curves of its seeds, CPU-seconds curves of its seeds,
    budget in steps)``; a missing budget is the last validation step."""
    rows = []
    for label, curves, cpu_curves, budget in groups:
        curve = mean_curve(curves)
        if not curve:
            continue
        cpu = mean_curve(cpu_curves)
        steps = int(budget) if budget else curve[-1][0]
        row = [label, f"{steps:,}"]
        for threshold in thresholds:
            step = first_reaching(curve, threshold)
            if step is None:
                row.append(f"> budget ({steps:,} steps, best {max(v for _, v in curve):.3f})")
                continue
            seconds = value_at(cpu, step)
            row.append(f"{step:,} steps, {seconds:.0f} CPU s" if seconds is not None else f"{step:,} steps")
        rows.append(row)
    return rows


def plot_compute(
    panels: Sequence[tuple[str, Sequence[tuple[str, Curve, Curve]], Sequence[tuple[str, float]]]],
    out: Path,
    *,
    ylabel: Callable[[str], str] = lambda task: task,
) -> Path | None:
    """One panel per task: each line ``(label, validation curve, CPU curve)`` drawn against CPU
    seconds; dashed lines for ``(label, value)`` references (baselines).  ``None`` when nothing
    has both curves."""
    panels = [p for p in panels if any(cpu and curve for _, curve, cpu in p[1])]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (task, lines, references) in zip(axes[0], panels, strict=True):
        for label, curve, cpu in lines:
            points = [(value_at(cpu, step), value) for step, value in curve]
            points = [(x, y) for x, y in points if x is not None]
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, label=label)
        for label, value in references:
            ax.axhline(value, linestyle="--", linewidth=1, color="grey")
            ax.annotate(label, (0, value), xycoords=("axes fraction", "data"), fontsize=7, xytext=(2, 2),
                        textcoords="offset points", color="grey")
        ax.set_title(f"{task}: validation figure against training compute")
        ax.set_xlabel("training CPU seconds")
        ax.set_ylabel(ylabel(task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "accuracy_vs_compute.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
