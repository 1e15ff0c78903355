"""Study reports rebuilt from the tracking store alone.

Every number, curve and gallery image comes from the MLflow runs of the study (a parent run and
one child run per cell), so a report can be rebuilt anywhere the store is reachable:
``report.md`` and ``report.html`` (self-contained, images inline), ``results.csv`` (one row per
cell) and PNG plots.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlzoo.study.zeroshot import ZERO_SHOT_TAG  # noqa: E402
from vlzoo.tracking import tracking_client  # noqa: E402

if TYPE_CHECKING:
    from vlzoo.tracking import MlflowClient

__all__ = ["CellResult", "collect_results", "build_report", "comparison_tables", "STUDY_TAG", "ROLE_TAG"]

STUDY_TAG = "vlzoo.study"
ROLE_TAG = "vlzoo.role"  # "study" for the parent, "cell" or "baseline" for a child
BASELINE_TAG = "vlzoo.baseline"  # which baseline a "baseline" child run holds
CELL_KEY_TAG = "vlzoo.cell_key"
STATUS_TAG = "vlzoo.cell_status"  # finished | failed | unsupported
ERROR_TAG = "vlzoo.error"
COMPARE_TAG = "vlzoo.compare"  # the study's declared comparisons, JSON (parent run)
GRID_PREFIX = "grid."
#: grid keys a baseline does not depend on (it depends on the data only)
NOT_DATA_KEYS = ("paradigm", "seed", "budget")
#: marker of a figure below the random-object baseline of the same data
BELOW_MARK = " ↓"
COST_KEYS = (
    "cost/train_seconds",
    "cost/train_cpu_seconds",
    "cost/peak_memory_mb",
    "cost/latency_ms_per_query",
    "cost/latency_ms_per_object",
    "cost/tokens_per_object",
    "params/trainable",
    "params/total",
)


@dataclass
class CellResult:
    run_id: str
    key: str
    values: dict[str, str]
    status: str
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: str = ""  # the baseline's name for a baseline run ("random_object", ...), else ""
    zero_shot: bool = False  # an off-the-shelf model tested as it is (tag vlzoo.zero_shot)
    #: the task this row scores a task-mix cell (``task=rec+res``) on; "" for a single-task cell
    scored: str = ""

    @property
    def paradigm(self) -> str:
        """The ``paradigm`` grid value; a part that fixes its paradigm in the recipe pattern has
        none, and is named by its part (e.g. ``heatmap``) instead."""
        return self.values.get("paradigm") or self.values.get("part", "")

    @property
    def task(self) -> str:
        """The task the row's figures are read for: the cell's task, or for a task-mix cell the
        one task of the mix this row scores (:func:`split_mixes`)."""
        return self.scored or self.values.get("task", "")

    @property
    def setting(self) -> str:
        """The data the result was measured on: grid values without paradigm, seed and budget
        (cells and baselines of one setting are compared)."""
        return ",".join(f"{k}={v}" for k, v in self.values.items() if k not in NOT_DATA_KEYS)

    @property
    def group(self) -> str:
        rest = ",".join(f"{k}={v}" for k, v in self.values.items() if k != "seed")
        if self.scored:
            rest = f"{rest},scored={self.scored}"
        return f"baseline={self.baseline},{rest}" if self.baseline else rest

    @property
    def label(self) -> str:
        """The row name in the report's tables."""
        if self.baseline:
            from vlzoo.study.baselines import BASELINE_LABELS

            return f"{BASELINE_LABELS.get(self.baseline, self.baseline)} (baseline): {self.setting}"
        return f"{self.group} (zero-shot)" if self.zero_shot else self.group


def find_parent_run(client: MlflowClient, experiment_name: str, study: str) -> Any:
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise ValueError(f"no MLflow experiment '{experiment_name}' in this tracking store: has study '{study}' run?")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`{ROLE_TAG}` = 'study'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ValueError(f"no parent run of study '{study}' in experiment '{experiment_name}'")
    return runs[0]


def collect_results(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[CellResult]:
    """One CellResult per cell (the newest run of each cell key; a task-mix cell once per task of
    its mix, :func:`split_mixes`), then one per baseline run of data some cell uses."""
    cells = split_mixes(_collect(client, experiment_id, parent_run_id, "cell"))
    # a baseline whose data no cell uses any more (its part's grid changed since) is left out
    settings = {r.setting for r in cells}
    return cells + [r for r in _collect(client, experiment_id, parent_run_id, "baseline") if r.setting in settings]


def split_mixes(results: list[CellResult]) -> list[CellResult]:
    """A cell trained on a task mix (``task=rec+res``) becomes one row per task of the mix, each
    read for that task's figures (``scored``) - the same run, so the report puts the mix next to
    the single-task cells in every table of each task."""
    from dataclasses import replace

    from vlzoo.study.spec import task_mix

    out = []
    for r in results:
        tasks = task_mix(r.values.get("task", ""))
        out += [replace(r, scored=t) for t in tasks] if len(tasks) > 1 else [r]
    return out


def _collect(client: MlflowClient, experiment_id: str, parent_run_id: str, role: str) -> list[CellResult]:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{ROLE_TAG}` = '{role}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )
    newest: dict[str, Any] = {}
    for run in runs:
        newest[run.data.tags.get(CELL_KEY_TAG, run.info.run_id)] = run
    # the study's grid order (cell index), whatever order the cells ran or were recorded in
    ordered = sorted(newest.items(), key=lambda kv: int(kv[1].data.tags.get("vlzoo.cell_index", 1 << 30)))
    results = []
    for key, run in ordered:
        tags = run.data.tags
        values = {k[len(GRID_PREFIX) :]: v for k, v in tags.items() if k.startswith(GRID_PREFIX)}
        order = tags.get("vlzoo.grid_order", "")
        if order:
            values = {k: values[k] for k in order.split(",") if k in values}
        results.append(
            CellResult(
                run_id=run.info.run_id,
                key=key,
                values=values,
                status=tags.get(STATUS_TAG, "running"),
                error=tags.get(ERROR_TAG, ""),
                metrics=dict(run.data.metrics),
                baseline=tags.get(BASELINE_TAG, "") if role == "baseline" else "",
                zero_shot=tags.get(ZERO_SHOT_TAG) == "true",
            )
        )
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def _task_metrics(results: list[CellResult], task: str, split: str) -> list[str]:
    prefix = f"{split}/{task}/"
    names = sorted({k[len(prefix) :] for r in results if r.task == task for k in r.metrics if k.startswith(prefix)})
    return names


def _aggregate(results: list[CellResult]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """group -> metric -> (mean, std, n) over the finished cells of the group (the seeds)."""
    by_group: dict[str, list[CellResult]] = defaultdict(list)
    for r in results:
        if r.status == "finished":
            by_group[r.group].append(r)
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for group, rs in by_group.items():
        names = sorted({k for r in rs for k in r.metrics})
        out[group] = {}
        for name in names:
            vals = [r.metrics[name] for r in rs if name in r.metrics and not math.isnan(r.metrics[name])]
            m, s = _mean_std(vals)
            out[group][name] = (m, s, len(vals))
    return out


def _fmt(mean: float, std: float, n: int, *, scale: float = 1.0, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    if n > 1:
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}"


def _higher_is_better(metric: str) -> bool:
    return not any(s in metric for s in ("loss", "fail", "latency", "seconds", "memory", "tokens"))


@dataclass
class _Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def _selection_baselines(results: list[CellResult]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """setting -> per figure, the higher of its selection baselines (a random object; for RES
    also the union of every object) - what a cell must beat to select."""
    from vlzoo.study.baselines import SELECTION_BASELINES

    agg = _aggregate(results)
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for r in results:
        if r.baseline in SELECTION_BASELINES and r.group in agg:
            best = out.setdefault(r.setting, {})
            for column, value in agg[r.group].items():
                if column not in best or (not math.isnan(value[0]) and value[0] > best[column][0]):
                    best[column] = value
    return out


def _flag(text: str, result: CellResult, column: str, mean: float, selection: dict[str, dict]) -> str:
    """Mark a cell's figure below the selection baselines of the same data (the higher of a
    random object and, for RES, the union of every object)."""
    if result.baseline or not _higher_is_better(column) or column.startswith(("cost/", "params/")):
        return text
    base = selection.get(result.setting, {}).get(column)
    # a random object at the maximum (one object per image) is the answer itself: nothing to select
    if base is not None and base[0] < 1.0 - 1e-9 and not math.isnan(mean) and mean < base[0] - 1e-9:
        return text + BELOW_MARK
    return text


_BELOW_NOTE = ("↓: below the random-object baseline of the same data - for RES below the higher of it and the union "
               "of every object (the cell does not select the referred object).")


def _tables(results: list[CellResult], primary: dict[str, str]) -> list[_Table]:
    agg = _aggregate(results)
    selection = _selection_baselines(results)
    tables = []
    tasks = list(dict.fromkeys(r.task for r in results if not r.baseline))
    for task in tasks:
        rs = [r for r in results if r.task == task]
        cell_rs = [r for r in rs if not r.baseline]
        metric_names = [m for m in _task_metrics(cell_rs, task, "test") if "/" not in m]  # by_kind/...: own table
        splits = sorted({k.split("/")[0] for r in cell_rs for k in r.metrics if k.count("/") == 2 and k.split("/")[1] == task})
        cols = [f"test/{task}/{m}" for m in metric_names]
        cols += [f"{s}/{task}/{primary.get(task, metric_names[0] if metric_names else '')}" for s in splits if s not in ("test", "val", "train")]
        cols += [c for c in COST_KEYS]
        groups = list(dict.fromkeys(r.group for r in rs))
        cell_groups = {r.group for r in cell_rs}
        # the best per column among the cells of one setting (one rung: the same data)
        setting_of = {r.group: r.setting for r in rs}
        best: dict[tuple[str, str], float] = {}
        for c in cols:
            for setting in dict.fromkeys(setting_of.values()):
                vals = [
                    agg[g][c][0]
                    for g in groups
                    if g in cell_groups and setting_of[g] == setting and g in agg and c in agg[g]
                    and not math.isnan(agg[g][c][0])
                ]
                # a column where every cell has the same value has no best
                if vals and len(set(vals)) > 1 and not c.startswith(("cost/", "params/")):
                    best[(setting, c)] = max(vals) if _higher_is_better(c) else min(vals)
        header = ["cell", "status"] + [c.split("/", 1)[1] if c.startswith("test/") else c for c in cols]
        rows = []
        for g in groups:
            members = [r for r in rs if r.group == g]
            statuses = sorted({r.status for r in members})
            status = "/".join(statuses)
            if any(r.status == "unsupported" for r in members):
                status = "unsupported: " + members[0].error
            elif any(r.status == "failed" for r in members):
                status = "failed: " + next(r.error for r in members if r.status == "failed")[:80]
            elif members[0].baseline:
                status = "baseline (no training)"
            elif members[0].zero_shot and status == "finished":
                status = "zero-shot (no training)"
            row = [members[0].label, status]
            for c in cols:
                if g in agg and c in agg[g]:
                    m, s, n = agg[g][c]
                    if c.startswith("params/"):
                        cell = f"{m:,.0f}"
                    else:
                        cell = _fmt(m, s, n, digits=1 if c.startswith("cost/") else 3)
                    top = best.get((setting_of[g], c))
                    if top is not None and g in cell_groups and not math.isnan(m) and abs(m - top) < 1e-12:
                        cell = f"**{cell}**"
                    row.append(_flag(cell, members[0], c, m, selection))
                else:
                    row.append("-")
            rows.append(row)
        note = _BELOW_NOTE if any(BELOW_MARK in c for row in rows for c in row) else ""
        tables.append(_Table(title=f"Task `{task}`", header=header, rows=rows, note=note))
    return tables


def _kind_tables(results: list[CellResult], primary: dict[str, str]) -> list[_Table]:
    """Per task: the primary test figure per kind of referring expression (Shapes), cells and
    baselines, with the number of samples of each kind."""
    from vlzoo.structures import EXPRESSION_KINDS

    agg = _aggregate(results)
    selection = _selection_baselines(results)
    tables = []
    for task in dict.fromkeys(r.task for r in results if not r.baseline):
        metric = primary.get(task)
        prefix = f"test/{task}/by_kind/"
        found = {k[len(prefix) :].split("/")[0] for r in results if r.task == task for k in r.metrics if k.startswith(prefix)}
        kinds = [k for k in EXPRESSION_KINDS if k in found] + sorted(found - set(EXPRESSION_KINDS))
        if not kinds or metric is None:
            continue
        header = ["cell"] + [f"{kind} ({metric})" for kind in kinds] + ["samples per kind"]
        rows = []
        for g in dict.fromkeys(r.group for r in results if r.task == task and r.status == "finished"):
            member = next(r for r in results if r.group == g)
            row = [member.label]
            for kind in kinds:
                column = f"{prefix}{kind}/{metric}"
                value = agg.get(g, {}).get(column)
                row.append("-" if value is None else _flag(_fmt(*value), member, column, value[0], selection))
            counts = [agg.get(g, {}).get(f"{prefix}{kind}/count") for kind in kinds]
            row.append(" / ".join("-" if c is None else f"{c[0]:.0f}" for c in counts))
            rows.append(row)
        tables.append(
            _Table(
                title=f"Task `{task}` by kind of referring expression (test)",
                header=header,
                rows=rows,
                note=_BELOW_NOTE if any(BELOW_MARK in c for row in rows for c in row) else "",
            )
        )
    return tables


def _seed_figures(results: list[CellResult], column: str) -> list[tuple[str, float]]:
    """``(seed, figure)`` of each result that has ``column``, in seed order."""
    got = [(r.values.get("seed", "-"), r.metrics[column]) for r in results if column in r.metrics]
    return sorted(((seed, v) for seed, v in got if not math.isnan(v)), key=lambda item: (len(item[0]), item[0]))


def comparison_tables(results: list[CellResult], primary: dict[str, str], comparisons: list[dict[str, str]]) -> list[_Table]:
    """One table per declared comparison (``study.compare``): a row per setting and task where
    both arms finished - each arm's mean ± std and per-seed figures of the task's primary test
    metric, the difference, its 95 % Welch interval and the verdict."""
    from vlzoo.study.compare import LEVEL, verdict, welch_interval

    tables = []
    cells = [r for r in results if not r.baseline and r.status == "finished"]
    for comp in comparisons:
        axis, a, b, part = comp["axis"], str(comp["a"]), str(comp["b"]), comp.get("part", "")
        arms: dict[tuple[str, str], dict[str, list[CellResult]]] = {}
        for r in cells:
            if r.values.get("part", "") != part or r.values.get(axis) not in (a, b):
                continue
            context = ",".join(f"{k}={v}" for k, v in r.values.items() if k not in ("seed", axis, "part"))
            arms.setdefault((context, r.task), {a: [], b: []})[r.values[axis]].append(r)
        rows = []
        for (context, task), members in arms.items():
            metric = primary.get(task)
            if metric is None or not members[a] or not members[b]:
                continue
            column = f"test/{task}/{metric}"
            fa, fb = _seed_figures(members[a], column), _seed_figures(members[b], column)
            if not fa or not fb:
                continue
            interval = welch_interval([v for _, v in fa], [v for _, v in fb])
            ma, sa = _mean_std([v for _, v in fa])
            mb, sb = _mean_std([v for _, v in fb])
            ci = "-" if interval is None else f"[{interval.low:+.3f}, {interval.high:+.3f}]"
            rows.append([
                context or "-",
                f"{metric}",
                f"{_fmt(ma, sa, len(fa))} ({' / '.join(f'{v:.3f}' for _, v in fa)})",
                f"{_fmt(mb, sb, len(fb))} ({' / '.join(f'{v:.3f}' for _, v in fb)})",
                f"{ma - mb:+.3f}",
                ci,
                verdict(interval, a, b, higher_is_better=_higher_is_better(metric)),
            ])
        if rows:
            where = f" (part `{part}`)" if part else ""
            tables.append(_Table(
                title=f"Comparison{where}: {axis} = `{a}` vs `{b}`",
                header=["setting", "metric", f"{a}: mean ± std (per seed)", f"{b}: mean ± std (per seed)",
                        "difference", f"{LEVEL:.0%} interval", "verdict"],
                rows=rows,
                note=f"Test figures; seeds in seed order. The interval is Welch's t on the seeds of each arm "
                f"({LEVEL:.0%}); a verdict names an arm only when the interval excludes 0.",
            ))
    return tables


def _retention_table(results: list[CellResult], before: dict[str, float]) -> _Table | None:
    """Stage-0 text metrics of the backbone after each cell's training against before it."""
    agg = _aggregate(results)
    keys = sorted({k[len("retention/after/") :] for r in results for k in r.metrics if k.startswith("retention/after/")})
    keys = [k for k in keys if not k.endswith("parse_fail_rate")]
    if not keys:
        return None
    header = ["cell"] + [f"{k} (before -> after)" for k in keys]
    rows = []
    for group in dict.fromkeys(r.group for r in results if r.status == "finished"):
        row = [group]
        for k in keys:
            after = agg.get(group, {}).get(f"retention/after/{k}")
            b = before.get(f"retention/before/{k}")
            if after is None:
                row.append("-")
                continue
            text = f"{after[0]:.3f}" if b is None else f"{b:.3f} -> {after[0]:.3f} ({after[0] - b:+.3f})"
            row.append(text)
        rows.append(row)
    return _Table(title="Retention of general ability (stage-0 metrics of the backbone)", header=header, rows=rows)


def _metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    try:
        hist = client.get_metric_history(run_id, key)
    except Exception:  # a run without that metric has no history
        return []
    return sorted((m.step, m.value) for m in hist)


def _plot_curves(client: MlflowClient, results: list[CellResult], primary: dict[str, str], out: Path) -> Path | None:
    tasks = list(dict.fromkeys(r.task for r in results if r.status == "finished"))
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    drew = False
    for ax, task in zip(axes[0], tasks, strict=True):
        metric = primary.get(task) or next(iter(_task_metrics(results, task, "val")), None)
        if metric is None:
            continue
        for group in dict.fromkeys(r.group for r in results if r.task == task):
            curves = [
                _metric_history(client, r.run_id, f"val/{task}/{metric}")
                for r in results
                if r.task == task and r.group == group and r.status == "finished"
            ]
            paradigm = ",".join(part for part in group.split(",") if part != f"task={task}").replace("paradigm=", "")
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps = sorted({s for c in curves for s, _ in c})
            means = []
            for s in steps:
                vals = [v for c in curves for st, v in c if st == s]
                means.append(sum(vals) / len(vals))
            ax.plot(steps, means, marker="o", label=paradigm)
            drew = True
        ax.set_title(f"{task}: val {metric}")
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drew else None


def _plot_cost(results: list[CellResult], primary: dict[str, str], out: Path) -> Path | None:
    agg = _aggregate(results)
    points = []
    for r in results:
        if r.status != "finished" or r.group not in agg:
            continue
        metric = primary.get(r.task)
        key = f"test/{r.task}/{metric}"
        lat = agg[r.group].get("cost/latency_ms_per_query")
        acc = agg[r.group].get(key)
        if lat and acc:
            rung = r.values.get("rung")
            points.append((r.paradigm + (f" ({rung})" if rung else ""), r.task, lat[0], acc[0], metric))
    points = list(dict.fromkeys(points))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = {t: m for t, m in zip(dict.fromkeys(p[1] for p in points), "os^Dvx*", strict=False)}
    for paradigm, task, lat, acc, _metric in points:
        ax.scatter([lat], [acc], marker=markers[task], s=60)
        ax.annotate(f"{paradigm}/{task}", (lat, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("latency per query (ms)")
    ax.set_ylabel("test primary metric (" + ", ".join(sorted({f'{p[1]}: {p[4]}' for p in points})) + ")")
    ax.set_title("accuracy vs inference latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "accuracy_vs_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_splits(results: list[CellResult], primary: dict[str, str], out: Path) -> Path | None:
    agg = _aggregate(results)
    bars = []
    for group in dict.fromkeys(r.group for r in results if r.status == "finished"):
        r = next(x for x in results if x.group == group)
        metric = primary.get(r.task)
        if metric is None:
            continue
        for split in ("test", "comp_test"):
            v = agg.get(group, {}).get(f"{split}/{r.task}/{metric}")
            if v:
                rest = [f"{k}={val}" for k, val in r.values.items() if k not in ("paradigm", "task", "seed")]
                bars.append(("\n".join([r.paradigm, r.task, *rest]), split, v[0], v[1]))
    splits = list(dict.fromkeys(b[1] for b in bars))
    if len(splits) < 2:
        return None
    labels = list(dict.fromkeys(b[0] for b in bars))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 3.8))
    width = 0.8 / len(splits)
    for j, split in enumerate(splits):
        xs, ys, es = [], [], []
        for i, label in enumerate(labels):
            hit = [b for b in bars if b[0] == label and b[1] == split]
            if hit:
                xs.append(i + j * width)
                ys.append(hit[0][2])
                es.append(hit[0][3])
        ax.bar(xs, ys, width=width, yerr=es, label="in-distribution (test)" if split == "test" else "compositional")
    ax.set_xticks([i + width * (len(splits) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("primary metric")
    ax.set_title("generalisation: in-distribution vs compositional split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "accuracy_by_split.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _gallery(client: MlflowClient, results: list[CellResult], out: Path) -> list[Path]:
    """Per task (and rung: each rung has its own images): rows are the same test samples, one
    column per paradigm (first seed)."""
    paths = []
    for task, rung in dict.fromkeys((r.task, r.values.get("rung", "")) for r in results):
        mine = [r for r in results if r.task == task and r.values.get("rung", "") == rung]
        columns = []
        for paradigm in dict.fromkeys(r.paradigm for r in mine):
            cell = next((r for r in mine if r.paradigm == paradigm and r.status == "finished"), None)
            if cell is None:
                continue
            try:
                listing = client.list_artifacts(cell.run_id, "gallery")
            except Exception:  # a cell without a gallery (e.g. an old run) is left out of the figure
                listing = []
            if not listing:
                continue
            local = Path(client.download_artifacts(cell.run_id, "gallery", tempfile.mkdtemp()))
            columns.append((paradigm, sorted(local.glob("*.png"))))
        if not columns:
            continue
        rows = max(len(c[1]) for c in columns)
        fig, axes = plt.subplots(rows, len(columns), figsize=(2.6 * len(columns), 2.6 * rows), squeeze=False)
        for j, (paradigm, images) in enumerate(columns):
            for i in range(rows):
                ax = axes[i][j]
                ax.axis("off")
                if i < len(images):
                    ax.imshow(plt.imread(images[i]))
                if i == 0:
                    ax.set_title(paradigm, fontsize=9)
        where = f" ({rung} rung)" if rung else ""
        fig.suptitle(f"{task}{where}: ground truth (green) and prediction (red), same samples per row", fontsize=9)
        fig.tight_layout()
        path = out / (f"gallery_{task}_{rung}.png" if rung else f"gallery_{task}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _arm_label(result: CellResult) -> str:
    """The paradigm, and the cell's other grid values that are neither data nor protocol (e.g.
    ``pixel2emb (paradigm.refocus_lambda=0.1)``): the name of an arm in the first paragraph."""
    extra = [f"{k}={v}" for k, v in result.values.items() if k not in (*NOT_DATA_KEYS, "task", "rung", "part")]
    if result.scored:
        extra.append(f"trained on {result.values.get('task', '')}")
    if result.zero_shot:
        extra.append("zero-shot")
    if not extra:
        return result.paradigm
    return f"{result.paradigm} ({', '.join(extra)})" if result.paradigm else ", ".join(extra)


def _largest_budgets(results: list[CellResult]) -> dict[tuple[str, str, str], str]:
    """``(task, paradigm, rung) -> group`` of its largest budget (finished cells)."""
    chosen: dict[tuple[str, str, str], tuple[float, str]] = {}
    for r in results:
        if r.baseline or r.status != "finished":
            continue
        key = (r.task, _arm_label(r), r.values.get("rung", ""))
        budget = float(r.values.get("budget", 1))
        if key not in chosen or budget > chosen[key][0]:
            chosen[key] = (budget, r.group)
    return {k: g for k, (_, g) in chosen.items()}


def _summary(results: list[CellResult], primary: dict[str, str], before: dict[str, float]) -> str:
    from vlzoo.study.baselines import BASELINE_LABELS, SELECTION_BASELINES
    from vlzoo.study.summary import first_paragraph

    agg = _aggregate(results)
    scores = {}
    for (task, paradigm, rung), group in _largest_budgets(results).items():
        value = agg.get(group, {}).get(f"test/{task}/{primary.get(task)}")
        if value is not None and not math.isnan(value[0]):
            scores[(task, paradigm, rung)] = value[0]
    # per task and rung, the higher selection baseline of the first data it was computed on
    selection: dict[tuple[str, str], tuple[float, str]] = {}
    first_setting: dict[tuple[str, str], str] = {}
    for r in results:
        if r.baseline in SELECTION_BASELINES and r.group in agg:
            value = agg[r.group].get(f"test/{r.task}/{primary.get(r.task)}")
            key = (r.task, r.values.get("rung", ""))
            if value is None or math.isnan(value[0]) or first_setting.setdefault(key, r.setting) != r.setting:
                continue
            if key not in selection or value[0] > selection[key][0]:
                selection[key] = (value[0], BASELINE_LABELS.get(r.baseline, r.baseline))
    retention: dict[str, dict[str, tuple[float, float]]] = {}
    for r in results:
        if r.baseline or r.status != "finished":
            continue
        for key, after in r.metrics.items():
            if not key.startswith("retention/after/") or key.endswith("parse_fail_rate"):
                continue
            name = key[len("retention/after/") :]
            b = before.get(f"retention/before/{name}")
            if b is None:
                continue
            known = retention.setdefault(r.paradigm, {}).get(name)
            if known is None or after < known[1]:
                retention[r.paradigm][name] = (b, after)
    return first_paragraph(scores=scores, selection=selection, retention=retention, primary=primary)


def _time_to_accuracy(client: MlflowClient, results: list[CellResult], primary: dict[str, str]) -> list[_Table]:
    from vlzoo.study.curves import CPU_KEY, DEFAULT_THRESHOLDS, time_to_accuracy_rows

    tables = []
    trained = [r for r in results if r.status == "finished" and not r.baseline and not r.zero_shot]
    for task in dict.fromkeys(r.task for r in trained):
        metric = primary.get(task)
        if metric is None:
            continue
        groups = []
        for g in dict.fromkeys(r.group for r in trained if r.task == task):
            members = [r for r in results if r.group == g and r.status == "finished"]
            curves = [_metric_history(client, r.run_id, f"val/{task}/{metric}") for r in members]
            cpu = [_metric_history(client, r.run_id, CPU_KEY) for r in members]
            steps = [r.metrics["cost/train_steps"] for r in members if "cost/train_steps" in r.metrics]
            groups.append((g, curves, cpu, max(steps) if steps else None))
        rows = time_to_accuracy_rows(groups, DEFAULT_THRESHOLDS)
        if rows:
            header = ["cell", "budget (steps)"] + [f"val {metric} >= {t:g}" for t in DEFAULT_THRESHOLDS]
            tables.append(_Table(
                title=f"Time to accuracy: `{task}`",
                header=header,
                rows=rows,
                note="First validation step at which the seed-mean figure reaches the level, and the training "
                "CPU seconds of the cell process by then (process CPU time: independent of other load).",
            ))
    return tables


def _plot_compute(client: MlflowClient, results: list[CellResult], primary: dict[str, str], out: Path) -> Path | None:
    from vlzoo.study.baselines import SELECTION_BASELINE
    from vlzoo.study.curves import CPU_KEY, mean_curve, plot_compute

    agg = _aggregate(results)
    panels = []
    largest = _largest_budgets(results)
    for task in dict.fromkeys(t for t, _, _ in largest):
        metric = primary.get(task)
        if metric is None:
            continue
        lines = []
        for (t, paradigm, rung), group in largest.items():
            if t != task:
                continue
            members = [r for r in results if r.group == group and r.status == "finished"]
            if any(r.zero_shot for r in members):
                continue  # tested as it is: no training curve
            curve = mean_curve([_metric_history(client, r.run_id, f"val/{task}/{metric}") for r in members])
            cpu = mean_curve([_metric_history(client, r.run_id, CPU_KEY) for r in members])
            lines.append((paradigm + (f", {rung}" if rung else ""), curve, cpu))
        references = []
        for r in results:
            if r.baseline == SELECTION_BASELINE and r.task == task and r.group in agg:
                value = agg[r.group].get(f"test/{task}/{metric}")
                rung = r.values.get("rung", "")
                label = f"random object{', ' + rung if rung else ''}"
                if value is not None and label not in {lab for lab, _ in references}:
                    references.append((label, value[0]))
        panels.append((task, lines, references))
    return plot_compute(panels, out, ylabel=lambda task: f"val {primary.get(task)}")


def _markdown(title: str, intro: list[str], tables: list[_Table], images: list[Path]) -> str:
    lines = [f"# {title}", ""] + intro + [""]
    for t in tables:
        lines += [f"## {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(r) + " |" for r in t.rows]
        lines.append("")
        if t.note:
            lines += [t.note, ""]
    if images:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in images]
        lines.append("")
    return "\n".join(lines)


def _html(title: str, intro: list[str], tables: list[_Table], images: list[Path]) -> str:
    def cell(text: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "font-size:13px;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td:first-child,td:nth-child(2){text-align:left}img{max-width:100%;display:block;margin:1em 0}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(line.replace('`', ''))}</p>" for line in intro if line]
    for t in tables:
        parts.append(f"<h2>{html.escape(t.title.replace('`', ''))}</h2><table><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in t.header]
        parts.append("</tr>")
        for r in t.rows:
            parts.append("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>")
        parts.append("</table>")
        if t.note:
            parts.append(f"<p>{html.escape(t.note)}</p>")
    for p in images:
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(p.stem)}</h3><img alt='{p.stem}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(
    *,
    study: str,
    tracking_uri: str,
    out_dir: str | Path,
    experiment_name: str | None = None,
    primary: dict[str, str] | None = None,
    log_to_parent: bool = True,
) -> Path:
    """Rebuild a study's report from the tracking store; returns the path of ``report.md``."""
    client = tracking_client(tracking_uri)
    experiment_name = experiment_name or f"study-{study}"
    parent = find_parent_run(client, experiment_name, study)
    results = collect_results(client, parent.info.experiment_id, parent.info.run_id)
    if primary is None:
        primary = {
            k[len("vlzoo.primary.") :]: v for k, v in parent.data.tags.items() if k.startswith("vlzoo.primary.")
        }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        keys = sorted({k for r in results for k in r.metrics})
        grid_keys = list(dict.fromkeys(k for r in results for k in r.values))
        writer = csv.writer(fh)
        writer.writerow(["cell", *grid_keys, "status", "error", "run_id", *keys])
        for r in results:
            writer.writerow(
                [r.key, *(r.values.get(k, "") for k in grid_keys), r.status, r.error, r.run_id]
                + [r.metrics.get(k, "") for k in keys]
            )
    cells = [r for r in results if not r.baseline]
    comparisons = json.loads(parent.data.tags.get(COMPARE_TAG) or "[]")
    tables = comparison_tables(results, primary, comparisons)
    tables += _tables(results, primary)
    tables += _kind_tables(results, primary)
    tables += _time_to_accuracy(client, cells, primary)
    kept = _retention_table(cells, dict(parent.data.metrics))
    if kept is not None:
        tables.append(kept)
    images = [
        p
        for p in (
            _plot_curves(client, cells, primary, out),
            _plot_compute(client, results, primary, out),
            _plot_cost(cells, primary, out),
            _plot_splits(cells, primary, out),
        )
        if p is not None
    ]
    images += _gallery(client, cells, out)
    summary = _summary(results, primary, dict(parent.data.metrics))
    counts = defaultdict(int)
    runs = {}
    for r in cells:  # a task-mix cell has one row per task it is scored on: count its run once
        runs.setdefault(r.run_id or r.key, r.status)
    for status in runs.values():
        counts[status] += 1
    tags = parent.data.tags
    intro = ([summary, ""] if summary else []) + [
        f"Study `{study}`: {tags.get('vlzoo.description', '')}",
        f"Cells: {len(runs)} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}). "
        f"Budget: {tags.get('vlzoo.budget', '-')}. Stage 0: {tags.get('vlzoo.stage0', 'none')}.",
        f"Command: `{tags.get('vlzoo.command', '')}`",
        "Values are mean ± std over seeds; the best per column (among cells on the same data) is in bold; costs are measured by one "
        "harness on one machine (latency per query at batch size 1, tokens per object generated). "
        "Baseline rows are computed on the same splits by the same evaluator, without training.",
    ]
    title = f"vlzoo study report: {study}"
    (out / "report.md").write_text(_markdown(title, intro, tables, images))
    (out / "report.html").write_text(_html(title, intro, tables, images))
    if log_to_parent:
        for name in ("report.md", "report.html", "results.csv"):
            client.log_artifact(parent.info.run_id, str(out / name), "report")
        for p in images:
            client.log_artifact(parent.info.run_id, str(p), "report")
    return out / "report.md"
