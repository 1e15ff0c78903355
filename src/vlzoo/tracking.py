"""Tracking: the one module of vlzoo that talks to MLflow.

* Tracking goes through Lightning's :class:`~lightning.pytorch.loggers.MLFlowLogger`.  Without a
  ``tracking_uri`` the run is stored in ``sqlite:///<output_dir>/mlflow.db`` with artifacts in
  ``<output_dir>/mlruns``; a recipe's ``logger.tracking_uri`` or ``--tracking-uri`` can point at a
  server instead (:func:`resolve_tracking_uri`, :func:`make_logger`).
* :func:`run_tags` describe a run (paradigm, backbone, data, task, vlzoo version, git commit).
* Faults (docs/faults.md): :func:`check_tracking` / :func:`preflight_tracking` make an unreachable
  or unwritable store a clear :class:`TrackingError` before anything is built;
  :class:`ResilientMLFlowLogger` survives losing the server mid-run and keeps the metrics in local
  files, which :func:`upload_offline_run` sends to the server later.
* The client API the rest of vlzoo uses instead of importing MLflow: :func:`tracking_client`
  (an ``MlflowClient``), :func:`find_run` (a run or ``None``), :func:`run_in_store`.

Nothing else in ``src/vlzoo`` imports ``mlflow``; MLflow itself is imported on first use, so
importing this module (and :mod:`vlzoo.build`) stays light.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from vlzoo.config import Recipe, RecipeError, instantiate
from vlzoo.config.targets import BUILT_AS, DEFAULT_LOGGER_TARGET
from vlzoo.version import __version__

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    "DEFAULT_TRACKING_URI",
    "DEFAULT_EXPERIMENT",
    "CHECKPOINT_DIR_TAG",
    "RECIPE_NAME_TAG",
    "tracking_uri_for",
    "resolve_tracking_uri",
    "make_logger",
    "run_tags",
    "git_commit",
    "TrackingError",
    "check_tracking",
    "temporary_environment",
    "preflight_tracking",
    "uses_mlflow",
    "ResilientMLFlowLogger",
    "upload_offline_run",
    "tracking_client",
    "find_run",
    "run_in_store",
]

#: The embedded default: a SQLite file in the output directory (the working directory by default).
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "vlzoo"
#: MLflow tag naming the folder of a run's checkpoints (used by ``fit --resume``).
CHECKPOINT_DIR_TAG = "vlzoo.checkpoint_dir"
#: MLflow tag naming the recipe of a run (``fit --resume`` looks for the latest run of a recipe).
RECIPE_NAME_TAG = "vlzoo.recipe"
#: What MLflow refuses in a metric name (as Lightning's MLFlowLogger strips it).
_METRIC_KEY_JUNK = re.compile(r"[^a-zA-Z0-9_/. -]+")
#: The reviewed recipe target of :class:`ResilientMLFlowLogger` (``vlzoo.targets.RUN_PARTS``).
RESILIENT_LOGGER_TARGET = "vlzoo.tracking.ResilientMLFlowLogger"


def tracking_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client of the store at ``tracking_uri`` (the study runner, the report and
    ``vlzoo export`` read and write runs through it)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def find_run(tracking_uri: str, run_id: str) -> Run | None:
    """The MLflow run ``run_id`` of the store at ``tracking_uri``, or ``None`` when the store has
    no such run (any other failure of the store raises)."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking_client(tracking_uri).get_run(run_id)
    except MlflowException:
        return None


def run_in_store(tracking_uri: str, run_id: str) -> bool:
    """Whether the store at ``tracking_uri`` holds the run ``run_id``."""
    return find_run(tracking_uri, run_id) is not None


def tracking_uri_for(output_dir: str | Path) -> str:
    """The embedded default tracking URI for ``output_dir`` (absolute, so runs do not depend on
    the directory a later command starts in)."""
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(recipe: Recipe, *, output_dir: str | Path = ".", tracking_uri: str | None = None) -> str:
    """The tracking URI of a run: ``tracking_uri`` (``--tracking-uri``), else the recipe's
    ``logger.tracking_uri``, else the embedded default ``<output_dir>/mlflow.db``."""
    uri = tracking_uri or (recipe.get("logger.tracking_uri") if isinstance(recipe.slot("logger"), Mapping) else None)
    if uri in (None, "", DEFAULT_TRACKING_URI):
        return tracking_uri_for(output_dir)
    return str(uri)


def git_commit(folder: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``folder`` (vlzoo's source by default), or ``None``."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def make_logger(
    recipe: Recipe,
    *,
    output_dir: str | Path = ".",
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> Logger:
    """The run's logger: the recipe's ``logger`` slot, or an :class:`MLFlowLogger` when the slot
    is absent.  ``tracking_uri`` (the command line's ``--tracking-uri``) wins over the recipe's;
    without either the run goes to ``<output_dir>/mlflow.db``.  ``run_id`` continues a run."""
    node = dict(recipe.slot("logger") or {})
    node.setdefault("_target_", DEFAULT_LOGGER_TARGET)  # no slot, or only the default logger's arguments
    node["tracking_uri"] = resolve_tracking_uri(recipe, output_dir=output_dir, tracking_uri=tracking_uri)
    inject: dict[str, Any] = {
        "experiment_name": DEFAULT_EXPERIMENT,
        "run_name": recipe.name,
    }
    if str(node["tracking_uri"]).split(":", 1)[0] in ("sqlite", "file"):
        # a local store keeps artifacts beside it; a tracking server keeps them where it is
        # configured to (`mlflow server --artifacts-destination`, proxied for every client)
        inject["artifact_location"] = (Path(output_dir).resolve() / "mlruns").as_uri()
    if run_id is not None:
        node["run_id"] = run_id
    if node.get("_target_") in MLFLOW_LOGGER_TARGETS:
        # same arguments; survives losing the server mid-run (metrics go to local files)
        node["_target_"] = RESILIENT_LOGGER_TARGET
    if node.get("_target_") in (RESILIENT_LOGGER_TARGET, "vlzoo.runs.ResilientMLFlowLogger"):  # the former path
        inject["offline_dir"] = Path(output_dir).resolve() / "offline"
    logger = instantiate(node, inject=inject, allow=recipe.allowed_prefixes, key="logger")
    if not isinstance(logger, Logger):
        raise RecipeError(
            f"recipe key logger._target_ (set in {recipe.source('logger._target_')}): "
            f"{node['_target_']} is not a Lightning Logger"
        )
    return logger


def _short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else ""


def run_tags(recipe: Recipe, model: Any = None) -> dict[str, str]:
    """Tags describing a run: paradigm, backbone, data, task, vlzoo version, git commit,
    recipe name, plus the recipe's own ``tags``."""
    backbone = recipe.slot("backbone") or {}
    backbone_name = ""
    for key in ("name_or_path", "model_name", "language", "vision"):
        value = backbone.get(key) if isinstance(backbone, Mapping) else None
        if isinstance(value, str):
            backbone_name = value
            break
        if isinstance(value, Mapping):
            inner = value.get("name_or_path") or value.get("model_name")
            if isinstance(inner, str):
                backbone_name = inner
                break
    if not backbone_name and isinstance(backbone, Mapping):
        backbone_name = _short(backbone.get("_target_"))
    data = recipe.slot("data") or {}
    tasks = data.get("tasks") if isinstance(data, Mapping) else None
    if tasks is None:
        evaluator = recipe.slot("evaluator") or {}
        tasks = evaluator.get("tasks") if isinstance(evaluator, Mapping) else None
    if tasks is None and model is not None:
        tasks = getattr(model, "tasks", None)
    paradigm = getattr(model, "name", None) if model is not None else None
    if not isinstance(paradigm, str):
        paradigm = _short((recipe.slot("paradigm") or {}).get("_target_"))
    tags = {
        "paradigm": paradigm,
        "backbone": backbone_name,
        "data": _short(data.get("_target_")) if isinstance(data, Mapping) else "",
        "task": ",".join(tasks) if isinstance(tasks, (list, tuple)) else str(tasks or ""),
        "vlzoo.version": __version__,
        RECIPE_NAME_TAG: recipe.name,
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    extra = recipe.data.get("tags") or {}
    if isinstance(extra, Mapping):
        tags.update({str(k): str(v) for k, v in extra.items()})
    return {k: v for k, v in tags.items() if v != ""}


class TrackingError(RecipeError):
    """The MLflow tracking store of a run cannot be reached or written (raised before anything
    is built, so a misspelled or stopped server costs no model build and no training step)."""


#: MLflow logger targets that :func:`make_logger` builds as :class:`ResilientMLFlowLogger`.
MLFLOW_LOGGER_TARGETS = tuple(t for t, built in BUILT_AS.items() if built == RESILIENT_LOGGER_TARGET)


def _first_line(err: BaseException, limit: int = 400) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text[:limit]}"


def uses_mlflow(recipe: Recipe) -> bool:
    """True when the run is tracked with MLflow (the ``logger`` slot is absent or an MLFlowLogger)."""
    node = recipe.slot("logger")
    if node is None:
        return True
    return isinstance(node, Mapping) and str(node.get("_target_", DEFAULT_LOGGER_TARGET)).rsplit(".", 1)[-1] in (
        "MLFlowLogger",
        "ResilientMLFlowLogger",
    )


def check_tracking(uri: str, *, timeout: int = 10) -> None:
    """Raise :class:`TrackingError` unless the MLflow tracking store at ``uri`` answers.

    One request without MLflow's retries (which wait minutes on a closed port) and with a
    ``timeout`` in seconds; for a SQLite URI this opens (and creates) the database file."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout))}
    try:
        with temporary_environment(**quick):
            tracking_client(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure of the store means the run cannot be tracked
        raise TrackingError(
            f"MLflow tracking at {uri} cannot be used ({_first_line(err)}). Nothing was built or trained. "
            "Start the tracking server (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000`), "
            "fix the URI (--tracking-uri or the recipe's logger.tracking_uri), or leave both out to track in "
            "OUTPUT_DIR/mlflow.db."
        ) from err


@contextlib.contextmanager
def temporary_environment(**values: str) -> Iterator[None]:
    """Set environment variables for the ``with`` block, then restore what was there before
    (MLflow reads its retry and progress-bar settings from the environment)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def preflight_tracking(recipe: Recipe, *, output_dir: str | Path = ".", tracking_uri: str | None = None) -> str | None:
    """Check the run's MLflow store before anything heavy is built; returns the URI checked
    (``None`` when the recipe's logger is not MLflow)."""
    if not uses_mlflow(recipe):
        return None
    uri = resolve_tracking_uri(recipe, output_dir=output_dir, tracking_uri=tracking_uri)
    check_tracking(uri)
    return uri


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's :class:`MLFlowLogger` that survives losing its tracking server mid-run.

    The first failing call to the server (after MLflow's own retries, see
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) switches the logger to local files and warns once:
    training goes on, and from then on metrics are appended to
    ``<offline_dir>/<run_id>/metrics.jsonl`` (one ``{"key", "value", "step", "timestamp"}`` per
    line, :func:`upload_offline_run` sends them to a server later), params to ``params.json``
    and the run's final status to ``run.json``.  :func:`make_logger` builds this class for a
    recipe's ``lightning.pytorch.loggers.MLFlowLogger``; its arguments are MLFlowLogger's plus
    ``offline_dir`` and ``flush_seconds``.

    **Metrics are written in batches** (issue 19): one ``log_batch`` to a SQLite store took
    13 ms wall, 6 ms CPU here (``benchmarks/bench_tracking.py``), about 1 % of a 100 ms training
    step when Lightning logs every 10 steps, and a tracking server adds a round trip.  ``log_metrics`` keeps the metrics and writes everything kept in one ``log_batch`` the
    first time, then at most every ``flush_seconds`` (``0``: every call, as MLFlowLogger), before
    a checkpoint is reported (``after_save_checkpoint``: what a resumed run does not redo is in
    the store) and in ``finalize`` (Lightning calls it when a run ends, fails or is interrupted);
    :meth:`flush` writes them on demand.  A run killed with SIGKILL loses at most the last
    ``flush_seconds`` of metrics after its last checkpoint, which a resumed run logs again.  Once
    the run is finalized, metrics are written at once.
    """

    #: MLflow takes at most this many metrics in one ``log_batch``
    MAX_METRICS_PER_BATCH = 1000

    def __init__(
        self,
        *,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        save_dir: str | None = "./mlruns",
        log_model: bool | str = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
        offline_dir: str | Path = "offline",
        flush_seconds: float = 5.0,
    ) -> None:
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),  # as MLFlowLogger
            tags=tags,
            save_dir=save_dir,
            log_model=log_model,  # type: ignore[arg-type]
            prefix=prefix,
            artifact_location=artifact_location,
            run_id=run_id,
            synchronous=synchronous,
        )
        self.offline_dir = Path(offline_dir)
        #: the error that lost the server (``None`` while it answers)
        self.lost: str | None = None
        #: the step of the first metric written locally
        self.lost_at_step: int | None = None
        if isinstance(flush_seconds, bool) or not isinstance(flush_seconds, (int, float)) or not flush_seconds >= 0:
            raise RecipeError(
                f"recipe key logger.flush_seconds: {flush_seconds!r} is not a number of seconds >= 0 "
                "(0 writes the metrics at every call)"
            )
        self.flush_seconds = float(flush_seconds)
        #: metrics kept since the last write: ``(key, value, timestamp ms, step)``
        self._pending: list[tuple[str, float, int, int]] = []
        self._last_flush: float | None = None  # monotonic time of the last write; None: never written
        self._finalized = False

    @property
    def offline_folder(self) -> Path:
        """Where this run's metrics go once the server is lost."""
        return self.offline_dir / (self._run_id or "unknown-run")

    def lose(self, err: BaseException, *, step: int | None = None) -> None:
        """Switch to local files (once) and tell the user where the metrics are."""
        if self.lost is not None:
            return
        self.lost = _first_line(err)
        self.lost_at_step = step
        folder = self.offline_folder
        folder.mkdir(parents=True, exist_ok=True)
        self._write_run_record(status="RUNNING")
        at = f" at step {step}" if step is not None else ""
        warnings.warn(
            f"vlzoo: lost the MLflow tracking server {self._tracking_uri}{at} ({self.lost}). Training goes on; "
            f"metrics are now written to {folder / 'metrics.jsonl'} (vlzoo.tracking.upload_offline_run sends them "
            "to a server later).",
            UserWarning,
            stacklevel=2,
        )

    def _write_run_record(self, *, status: str) -> None:
        record = {
            "run_id": self._run_id,
            "experiment_name": self._experiment_name,
            "tracking_uri": self._tracking_uri,
            "lost_at_step": self.lost_at_step,
            "error": self.lost,
            "status": status,
        }
        (self.offline_folder / "run.json").write_text(json.dumps(record, indent=1) + "\n")

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, str):  # as MLFlowLogger: MLflow metrics are numbers
                continue
            key = self._prefix + self.LOGGER_JOIN_CHAR + key if self._prefix else key
            clean = _METRIC_KEY_JUNK.sub("", key)
            if clean != key:
                warnings.warn(
                    f"vlzoo: MLflow metric names take only letters, digits and '_', '/', '.', ' ', '-'; "
                    f"{key!r} is logged as {clean!r}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._pending.append((clean, float(value), timestamp, int(step or 0)))
        now = time.monotonic()
        due = (
            self._finalized
            or self._last_flush is None
            or now - self._last_flush >= self.flush_seconds
            or len(self._pending) >= self.MAX_METRICS_PER_BATCH
        )
        if due:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Write the metrics kept since the last write: to the store, or to the local file once
        the server is lost (the first failing write switches to it, and the metrics it could
        not write go to the file, none twice)."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self.lost is None:
            from mlflow.entities import Metric

            done = 0
            try:
                for start in range(0, len(pending), self.MAX_METRICS_PER_BATCH):
                    chunk = pending[start : start + self.MAX_METRICS_PER_BATCH]
                    self.experiment.log_batch(
                        run_id=self.run_id,
                        metrics=[Metric(key=k, value=v, timestamp=t, step=s) for k, v, t, s in chunk],
                        **self._log_batch_kwargs,
                    )
                    done = start + len(chunk)
                return
            except Exception as err:  # noqa: BLE001 - whatever broke, the run must go on
                pending = pending[done:]
                self.lose(err, step=pending[0][3])
        lines = [json.dumps({"key": k, "value": v, "step": s, "timestamp": t}) for k, v, t, s in pending]
        with open(self.offline_folder / "metrics.jsonl", "a") as fh:
            fh.write("".join(line + "\n" for line in lines))

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self.lost is None:
            try:
                super().log_hyperparams(params)
                return
            except Exception as err:  # noqa: BLE001
                self.lose(err)
        path = self.offline_folder / "params.json"
        stored = json.loads(path.read_text()) if path.is_file() else {}
        stored.update({str(k): str(v) for k, v in dict(vars(params) if hasattr(params, "__dict__") else params).items()})
        path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.flush()
        self._finalized = True  # a later log_metrics (a test after fit) writes at once
        if self.lost is None:
            try:
                super().finalize(status)
                return
            except Exception as err:  # noqa: BLE001
                self.lose(err)
        mlflow_status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status)
        self._write_run_record(status=mlflow_status)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.flush()  # every step before the checkpoint is in the store: a resumed run redoes only later ones
        if self.lost is not None:
            return
        try:
            super().after_save_checkpoint(checkpoint_callback)
        except Exception as err:  # noqa: BLE001
            self.lose(err)


def upload_offline_run(folder: str | Path, *, tracking_uri: str | None = None) -> str:
    """Send what a :class:`ResilientMLFlowLogger` kept locally (``folder`` holds ``run.json``,
    ``metrics.jsonl``, maybe ``params.json``) to its MLflow run; returns the run id.

    ``tracking_uri`` defaults to the one the run was using.  Params already on the run are left
    alone; metrics are appended (uploading twice logs them twice)."""
    from mlflow.entities import Metric, Param

    folder = Path(folder)
    record_path = folder / "run.json"
    if not record_path.is_file():
        raise RecipeError(f"{folder} holds no run.json: not a folder written by vlzoo's offline fallback")
    record = json.loads(record_path.read_text())
    client = tracking_client(tracking_uri or record["tracking_uri"])
    run_id = record["run_id"]
    existing = client.get_run(run_id).data.params
    metrics_path = folder / "metrics.jsonl"
    metrics = []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                m = json.loads(line)
                metrics.append(Metric(key=m["key"], value=float(m["value"]), timestamp=int(m["timestamp"]), step=int(m["step"])))
    params_path = folder / "params.json"
    params = []
    if params_path.is_file():
        params = [Param(k, v) for k, v in json.loads(params_path.read_text()).items() if k not in existing]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    if record.get("status") in ("FINISHED", "FAILED", "KILLED"):
        client.set_terminated(run_id, record["status"])
    return run_id
