"""Running a study: a parent MLflow run, one child run per cell, resumable, parallel.

* ``prepare`` finds or creates the study's parent run and runs the shared stage 0 once (its
  backbone checkpoint path is a tag of the parent run, reused by every cell and every later
  invocation).
* Each cell runs in its own process (``vlzoo study FILE --cell i``), so a crash, a memory peak
  or a hung cell cannot take the others with it; ``--jobs N`` runs N at a time.  On a cluster,
  launch the same command per cell index against a shared tracking server and file system.
* A finished cell (child run tagged ``finished``) is never rerun; a failed cell is recorded with
  its error and the others go on; the report is rebuilt from MLflow at the end.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlzoo.callbacks import CpuTimeCurve
from vlzoo.study.report import (
    BASELINE_TAG,
    CELL_KEY_TAG,
    COMPARE_TAG,
    ERROR_TAG,
    GRID_PREFIX,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    build_report,
)
from vlzoo.study.spec import BUDGET_KEY, PART_KEY, Cell, StudyError, StudySpec, expand_grid, load_study
from vlzoo.study.zeroshot import ZERO_SHOT_TAG, check_vocabulary, check_zero_shot
from vlzoo.tracking import temporary_environment, tracking_client

__all__ = [
    "StudyRun",
    "run_study",
    "run_cell",
    "paradigm_supports",
    "check_fairness",
    "CpuTimeCurve",
]


STAGE0_TAG = "vlzoo.stage0_checkpoint"
#: the key of the cell whose trained backbone a ``backbone_from`` cell started from
BACKBONE_FROM_TAG = "vlzoo.backbone_from"
FAIRNESS_KEYS = (
    "backbone.vision",
    "backbone.language",
    "backbone.projector",
    "backbone.checkpoint",
    "data.train",
    "data.val",
    "data.test",
    "data.batch_size",
    "evaluator",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "seed",
)


def paradigm_supports(recipe_path: Path, task: str) -> tuple[bool, str]:
    """Whether the paradigm class a recipe names supports ``task`` (its ``supported_tasks``)."""
    from vlzoo.config import load_recipe, locate

    if not recipe_path.is_file():
        from vlzoo.paradigms.catalog import list_paradigms

        known = list_paradigms(include_stage0=True)
        for name, cls in known.items():
            if recipe_path.stem.startswith(f"{name}_") and task not in cls.supported_tasks:
                return False, f"{name} does not support {task} (supports {', '.join(cls.supported_tasks)})"
        return False, f"no recipe {recipe_path.name}"
    recipe = load_recipe(recipe_path)
    target = recipe.get("paradigm._target_")
    if not target:
        return False, f"recipe {recipe_path.name} has no paradigm"
    cls = locate(str(target), recipe.allowed_prefixes)
    supported = tuple(getattr(cls, "supported_tasks", ()))
    if task not in supported:
        return False, f"{getattr(cls, 'name', target)} does not support {task} (supports {', '.join(supported)})"
    return True, ""


def check_fairness(
    cells: Sequence[Cell],
    *,
    extra_overrides: Sequence[str] = (),
    axes: Sequence[str] = ("paradigm",),
    exempt: Mapping[tuple[str, str], Sequence[str]] | None = None,
    declared: set[tuple[str, str]] | None = None,
) -> None:
    """Cells of one task that differ only in the paradigm - or only along another compared
    ``axes`` (``study.compare``) - must see the same data, backbone, starting checkpoint,
    budget and evaluator; raise :class:`StudyError` naming the key if not.  A compared axis that
    is itself one of those keys (e.g. ``data.train.size``) is the difference, not a mistake, and
    so are the keys a comparison declares in ``differ`` (``exempt``: ``(part, axis) -> keys``).
    With ``declared`` (``(part, axis)`` of the comparisons), an axis other than the paradigm is
    checked only within the parts that compare along it."""
    from vlzoo.config import load_recipe

    fingerprints: dict[int, dict[str, Any]] = {}
    for cell in cells:
        if cell.supported:
            recipe = load_recipe(cell.recipe, [*cell.overrides, *extra_overrides])
            fingerprints[cell.index] = {key: recipe.get(key) for key in FAIRNESS_KEYS}
    for axis in dict.fromkeys(axes):
        groups: dict[str, list[Cell]] = {}
        for cell in cells:
            if cell.index in fingerprints and axis in cell.values:
                rest = ",".join(f"{k}={v}" for k, v in cell.values.items() if k != axis)
                groups.setdefault(rest, []).append(cell)
        for members in groups.values():
            first_cell, first = members[0], fingerprints[members[0].index]
            part = str(first_cell.values.get(PART_KEY, ""))
            if declared is not None and axis != "paradigm" and (part, axis) not in declared:
                continue
            exempted = (exempt or {}).get((part, axis), ())
            keys = [k for k in FAIRNESS_KEYS
                    if not any(k == d or k.startswith(f"{d}.") or d.startswith(f"{k}.") for d in (axis, *exempted))]
            for cell in members[1:]:
                fingerprint = fingerprints[cell.index]
                for key in keys:
                    if fingerprint[key] != first[key]:
                        raise StudyError(
                            f"unfair study: cells '{first_cell.key}' and '{cell.key}' differ in recipe key "
                            f"{key} ({first[key]!r} vs {fingerprint[key]!r}); fix the recipes or set it "
                            f"under study.fixed so every {axis} gets the same"
                        )


class StudyRun:
    """One study against one tracking store and one output folder."""

    def __init__(
        self,
        spec: StudySpec,
        *,
        tracking_uri: str,
        output_dir: str | Path,
        parent_run_id: str | None = None,
    ) -> None:
        self.spec = spec
        self.tracking_uri = tracking_uri
        self.output_dir = Path(output_dir).resolve()
        self.client = tracking_client(tracking_uri)
        self.experiment_name = f"study-{spec.name}"
        self.parent_run_id = parent_run_id
        self.cells = expand_grid(spec, supports=paradigm_supports)

    # ------------------------------------------------------------------ tracking
    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        artifacts = (self.output_dir / "mlruns").as_uri() if self.tracking_uri.startswith("sqlite") else None
        return self.client.create_experiment(self.experiment_name, artifact_location=artifacts)

    def parent(self) -> str:
        """The parent run: the given one, else the newest of this study, else a new one."""
        if self.parent_run_id:
            return self.parent_run_id
        exp_id = self._experiment_id()
        runs = self.client.search_runs(
            [exp_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{self.spec.name}' and tags.`{ROLE_TAG}` = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            self.parent_run_id = runs[0].info.run_id
            return self.parent_run_id
        tags = {STUDY_TAG: self.spec.name, ROLE_TAG: "study", **self.spec_tags()}
        run = self.client.create_run(exp_id, tags=tags, run_name=f"study-{self.spec.name}")
        self.parent_run_id = run.info.run_id
        return self.parent_run_id

    def spec_tags(self) -> dict[str, str]:
        """What the report reads of the study file: description, budget, grid, comparisons,
        primary metrics (written at creation and again by every :meth:`run`, so an edited file's
        report says what its cells ran)."""
        def budget(part: Any) -> str:
            if part.zero_shot:
                return "zero-shot (no training)"
            return ", ".join(f"{k}={v}" for k, v in part.budget.items()) or "recipe default"

        parts = self.spec.parts
        named = len(parts) > 1 or parts[0].name
        tags = {
            "vlzoo.description": self.spec.description,
            "vlzoo.budget": "; ".join(f"{p.name}: {budget(p)}" for p in parts) if named else budget(parts[0]),
            "vlzoo.stage0": str(self.spec.stage0.name) if self.spec.stage0 else "none",
            "vlzoo.command": f"vlzoo study {shlex.quote(str(self.spec.path))}",
            "vlzoo.grid": json.dumps({p.name: p.grid for p in parts} if named else self.spec.grid),
            COMPARE_TAG: json.dumps([c.as_dict() for c in self.spec.comparisons]),
        }
        tags.update({f"vlzoo.primary.{k}": v for k, v in self.spec.primary.items()})
        return tags

    def write_spec_tags(self, *, command: bool = True) -> None:
        """Write :meth:`spec_tags` on the parent run, so a report says what the study file now
        declares (its appended parts' budgets too); ``command=False`` keeps the recorded command
        (a report rebuilt, or one cell run, is not the study's invocation)."""
        parent = self.parent()
        for key, value in self.spec_tags().items():
            if command or key != "vlzoo.command":
                self.client.set_tag(parent, key, value)

    def cell_runs(self) -> dict[str, Any]:
        """cell key -> newest child run."""
        parent = self.parent()
        runs = self.client.search_runs(
            [self._experiment_id()],
            filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`{ROLE_TAG}` = 'cell'",
            order_by=["attributes.start_time ASC"],
            max_results=10000,
        )
        return {r.data.tags.get(CELL_KEY_TAG): r for r in runs}

    def _cell_tags(self, cell: Cell, status: str) -> dict[str, str]:
        tags = {
            "mlflow.parentRunId": self.parent(),
            STUDY_TAG: self.spec.name,
            ROLE_TAG: "cell",
            CELL_KEY_TAG: cell.key,
            "vlzoo.cell_index": str(cell.index),
            "vlzoo.grid_order": ",".join(cell.values),
            STATUS_TAG: status,
        }
        tags.update({f"{GRID_PREFIX}{k}": str(v) for k, v in cell.values.items()})
        if cell.zero_shot:
            tags[ZERO_SHOT_TAG] = "true"
        if cell.backbone_from:
            tags[BACKBONE_FROM_TAG] = self.backbone_source(cell).key
        return tags

    # ------------------------------------------------------------------ backbones of other cells
    def backbone_source(self, cell: Cell) -> Cell:
        """The cell of part ``cell.backbone_from`` with ``cell``'s seed (its starting backbone)."""
        seed = str(cell.values.get("seed"))
        for other in self.cells:
            if other.values.get(PART_KEY) == cell.backbone_from and str(other.values.get("seed")) == seed:
                return other
        raise StudyError(f"cell {cell.index} [{cell.key}]: part {cell.backbone_from!r} has no cell with seed {seed}")

    def source_backbone(self, cell: Cell) -> Path | None:
        """The backbone file ``cell`` starts from when its part has ``backbone_from``: the
        trained backbone of the source cell's finished run, exported once next to that cell
        (``cells/<index>/backbone.pt``, :func:`vlzoo.checkpoints.export_backbone`); ``None`` else."""
        if not cell.backbone_from:
            return None
        from vlzoo.checkpoints import export_backbone

        source = self.backbone_source(cell)
        run = self.cell_runs().get(source.key)
        if run is None or run.data.tags.get(STATUS_TAG) != "finished":
            raise StudyError(
                f"cell {cell.index} [{cell.key}] starts from the backbone of cell {source.index} [{source.key}] "
                f"(study.parts.{cell.values.get(PART_KEY)}.backbone_from), which has not finished: run it first "
                f"(vlzoo study {self.spec.path} --cell {source.index})"
            )
        folder = self.output_dir / "cells" / f"{source.index:03d}"
        checkpoint = folder / "checkpoints" / run.info.run_id / "last.ckpt"
        if not checkpoint.is_file():
            raise StudyError(
                f"cell {cell.index} [{cell.key}] starts from the backbone of cell {source.index} [{source.key}], "
                f"but its checkpoint {checkpoint} is missing: rerun that cell (delete its run from the store)"
            )
        out = folder / "backbone.pt"
        if not out.is_file() or out.stat().st_mtime < checkpoint.stat().st_mtime:
            export_backbone(checkpoint, out)
        return out

    def new_cell_run(self, cell: Cell, status: str = "running") -> str:
        run = self.client.create_run(self._experiment_id(), tags=self._cell_tags(cell, status), run_name=cell.key)
        return run.info.run_id

    # ------------------------------------------------------------------ stage 0
    def stage0_checkpoint(self) -> Path | None:
        """Run the study's stage 0 once; later calls (and later invocations) reuse it."""
        if self.spec.stage0 is None or not self.spec.trains:  # zero-shot cells never use it
            return None
        parent = self.parent()
        tags = self.client.get_run(parent).data.tags
        known = tags.get(STAGE0_TAG)
        if known and Path(known).is_file():
            return Path(known)
        from vlzoo.study.stage0 import run_stage0

        path, metrics = run_stage0(
            self.spec.stage0,
            output_dir=self.output_dir / "stage0",
            tracking_uri=self.tracking_uri,
            overrides=self.spec.stage0_overrides,
        )
        for key, value in metrics.items():
            self.client.log_metric(parent, key, value)
        self.client.set_tag(parent, STAGE0_TAG, str(path))
        return path

    # ------------------------------------------------------------------ baselines
    def baseline_groups(self) -> dict[str, tuple[dict[str, Any], Cell]]:
        """Settings that baselines are computed for: the supported rec/res cells' grid values
        without paradigm and budget (a baseline depends on the data, not on them), each with
        its first cell (whose resolved recipe gives the splits and the evaluator)."""
        from vlzoo.study.baselines import BASELINE_TASKS

        out: dict[str, tuple[dict[str, Any], Cell]] = {}
        for cell in self.cells:
            if not cell.supported or cell.task not in BASELINE_TASKS:
                continue
            values = {k: v for k, v in cell.values.items() if k not in ("paradigm", BUDGET_KEY)}
            key = ",".join(f"{k}={v}" for k, v in values.items())
            out.setdefault(key, (values, cell))
        return out

    def baselines(self, *, log: Any = print) -> int:
        """Compute and record (once) every baseline of the study: a child run per baseline and
        setting, role ``baseline``, with the same metric names as the cells.  Returns how many
        settings were computed now."""
        if self.spec.baselines is None:
            return 0
        from vlzoo.config import load_recipe
        from vlzoo.study.baselines import recipe_baselines

        parent = self.parent()
        runs = self.client.search_runs(
            [self._experiment_id()],
            filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`{ROLE_TAG}` = 'baseline'",
            max_results=10000,
        )
        done = {r.data.tags.get(CELL_KEY_TAG) for r in runs if r.data.tags.get(STATUS_TAG) == "finished"}
        computed = 0
        for key, (values, cell) in self.baseline_groups().items():
            if any(k.endswith(f":{key}") for k in done):
                continue
            recipe = load_recipe(cell.recipe, list(cell.overrides))
            start = time.perf_counter()
            figures = recipe_baselines(recipe, cell.task, train_samples=int(self.spec.baselines["train_samples"]))
            for name, metrics in figures.items():
                tags = {
                    "mlflow.parentRunId": parent,
                    STUDY_TAG: self.spec.name,
                    ROLE_TAG: "baseline",
                    BASELINE_TAG: name,
                    CELL_KEY_TAG: f"{name}:{key}",
                    "vlzoo.grid_order": ",".join(values),
                    STATUS_TAG: "finished",
                    "vlzoo.cell_index": str(cell.index),
                }
                tags.update({f"{GRID_PREFIX}{k}": str(v) for k, v in values.items()})
                run = self.client.create_run(self._experiment_id(), tags=tags, run_name=f"{name}:{key}")
                for metric, value in metrics.items():
                    self.client.log_metric(run.info.run_id, metric, value)
                self.client.set_terminated(run.info.run_id, "FINISHED")
            log(f"  baselines [{key}]: {', '.join(figures)} in {time.perf_counter() - start:.1f} s")
            computed += 1
        return computed

    # ------------------------------------------------------------------ execution
    def pending(self) -> list[Cell]:
        done = self.cell_runs()
        out = []
        for cell in self.cells:
            run = done.get(cell.key)
            status = run.data.tags.get(STATUS_TAG) if run is not None else None
            if not cell.supported:
                if status != "unsupported":
                    run_id = self.new_cell_run(cell, "unsupported")
                    self.client.set_tag(run_id, ERROR_TAG, cell.reason)
                    self.client.set_terminated(run_id, "FINISHED")
                continue
            if status != "finished":
                out.append(cell)
        return out

    def _cell_command(self, cell: Cell) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vlzoo.cli",
            "study",
            str(self.spec.path),
            "--cell",
            str(cell.index),
            "--tracking-uri",
            self.tracking_uri,
            "--output-dir",
            str(self.output_dir),
            "--parent-run",
            self.parent(),
            "--no-report",
        ]

    def run(self, *, jobs: int = 1, log: Any = print) -> dict[str, int]:
        """Run every pending cell (``jobs`` at a time, each in its own process)."""
        check_fairness(self.cells, axes=self.spec.fairness_axes, exempt=self.spec.fairness_exemptions,
                       declared=self.spec.compared_axes)
        check_zero_shot(self.cells)
        self.write_spec_tags()
        self.stage0_checkpoint()
        self.baselines(log=log)
        todo = self.pending()
        log(f"study {self.spec.name}: {len(self.cells)} cells, {len(todo)} to run, {jobs} at a time")
        logs = self.output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)

        # cells in parallel share the cores: each gets its share of threads
        threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

        progress = _Progress(total=len(self.cells), done=len(self.cells) - len(todo), to_run=len(todo))

        def launch(cell: Cell) -> int:
            log(f"  cell {cell.index} [{cell.key}] started")
            with open(logs / f"cell-{cell.index:03d}.log", "w") as fh:
                proc = subprocess.run(
                    self._cell_command(cell), stdout=fh, stderr=subprocess.STDOUT, check=False, env=env
                )
            state = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {fh.name})"
            log(f"  cell {cell.index} [{cell.key}] {state}; {progress.step()}")
            return proc.returncode

        # the cells that start from another cell's backbone run after every other cell
        waves = [[c for c in todo if not c.backbone_from], [c for c in todo if c.backbone_from]]
        codes = []
        for wave in waves:
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                codes += list(pool.map(launch, wave))
        return {"cells": len(self.cells), "ran": len(todo), "failed": sum(1 for c in codes if c != 0)}

    def report(self) -> Path:
        # the report downloads every cell's artifacts: MLflow would draw a progress bar for each
        with temporary_environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
            return build_report(
                study=self.spec.name,
                tracking_uri=self.tracking_uri,
                out_dir=self.output_dir / "report",
                experiment_name=self.experiment_name,
                primary=self.spec.primary,
            )


class _Progress:
    """``"3/8 cells done, 4m10s so far, about 6m50s left"``: the cells done of the study's
    total, and the time left at the pace of the cells this invocation ran (thread-safe: cells
    finish in parallel with ``--jobs``)."""

    def __init__(self, *, total: int, done: int, to_run: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done, self.left, self.clock = total, done, to_run, clock
        self.ran = 0
        self.start = clock()
        self.lock = threading.Lock()

    def step(self) -> str:
        with self.lock:
            self.done, self.ran, self.left = self.done + 1, self.ran + 1, self.left - 1
            elapsed = self.clock() - self.start
            eta = f"about {_duration(elapsed / self.ran * self.left)} left" if self.left > 0 else "none left"
            return f"{self.done}/{self.total} cells done, {_duration(elapsed)} so far, {eta}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_study(
    path: str | Path,
    *,
    tracking_uri: str,
    output_dir: str | Path,
    jobs: int = 1,
    report: bool = True,
    log: Any = print,
) -> Path | None:
    spec = load_study(path)
    study = StudyRun(spec, tracking_uri=tracking_uri, output_dir=output_dir)
    summary = study.run(jobs=jobs, log=log)
    log(f"study {spec.name}: ran {summary['ran']} cell(s), {summary['failed']} failed")
    return study.report() if report else None


def _peak_memory_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's ``VmHWM`` first: ``ru_maxrss`` survives ``execve``, so a cell process started from
    a large parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_cell(
    path: str | Path,
    index: int,
    *,
    tracking_uri: str,
    output_dir: str | Path,
    parent_run_id: str | None = None,
) -> str:
    """Run cell ``index`` of a study in this process; returns its run id.  Raises on failure
    after recording it (status ``failed`` and the error) in the cell's run."""
    from vlzoo.callbacks import count_parameters
    from vlzoo.session import RunSession
    from vlzoo.study.measure import gallery, inference_cost, retention

    spec = load_study(path)
    study = StudyRun(spec, tracking_uri=tracking_uri, output_dir=output_dir, parent_run_id=parent_run_id)
    if not 0 <= index < len(study.cells):
        raise StudyError(f"study {spec.path}: --cell {index} is out of range (0..{len(study.cells) - 1})")
    cell = study.cells[index]
    done = study.cell_runs().get(cell.key)
    if done is not None and done.data.tags.get(STATUS_TAG) == "finished":
        return done.info.run_id
    if not cell.supported:
        raise StudyError(f"cell {index} [{cell.key}] is not supported: {cell.reason}")
    if cell.zero_shot:
        check_zero_shot([cell])  # before a run exists: the off-the-shelf model, or a clear error
    # a zero-shot cell is the off-the-shelf model: the study's stage 0 never reaches its backbone
    stage0 = None if cell.zero_shot else study.stage0_checkpoint()
    # a part with backbone_from starts from the backbone its source cell trained, not from stage 0
    start = study.source_backbone(cell) or stage0
    run_id = study.new_cell_run(cell)
    client = study.client
    cell_dir = study.output_dir / "cells" / f"{index:03d}"
    try:
        overrides = list(cell.overrides)
        if start is not None:
            overrides.append(f"backbone.checkpoint={start}")
        curve = CpuTimeCurve()
        # the same session as `vlzoo fit`: consent, tracking preflight, NaN handling, then test in memory
        session = RunSession(cell.recipe, overrides=overrides, output_dir=cell_dir, tracking_uri=tracking_uri,
                             run_id=run_id, keep_raw_images=True, callbacks=[curve])
        built = session.prepare("test" if cell.zero_shot else "fit")
        if cell.zero_shot:
            check_vocabulary(cell, built.model)
        start = time.perf_counter()
        if not cell.zero_shot:  # a zero-shot cell is tested as it is: nothing trains
            session.fit()
        train_seconds = time.perf_counter() - start
        session.test()
        metrics = {
            "cost/train_seconds": train_seconds,
            "cost/train_cpu_seconds": curve.seconds,
            "cost/train_steps": float(built.trainer.global_step),
            "cost/peak_memory_mb": _peak_memory_mb(),
        }
        trainable, total = count_parameters(built.model)
        # a zero-shot cell trained nothing, whatever the recipe's policy would train
        metrics["params/trainable"] = 0.0 if cell.zero_shot else float(trainable)
        metrics["params/total"] = float(total)
        metrics.update(inference_cost(built.model, built.datamodule))
        if stage0 is not None and spec.stage0 is not None:
            metrics.update(retention(built.model, spec.stage0, overrides=spec.stage0_overrides))
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
        samples = int(spec.gallery.get("samples", 6))
        for image in gallery(built.model, built.datamodule, cell_dir / "gallery", samples=samples):
            client.log_artifact(run_id, str(image), "gallery")
        client.set_tag(run_id, STATUS_TAG, "finished")
        client.set_terminated(run_id, "FINISHED")
    except BaseException as err:
        message = f"{type(err).__name__}: {err}".strip()
        client.set_tag(run_id, STATUS_TAG, "failed")
        client.set_tag(run_id, ERROR_TAG, message[:4000])
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id
