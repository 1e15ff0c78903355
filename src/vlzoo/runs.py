"""Runs: MLflow tracking, checkpoints that embed their recipe, and reloading them.

* Tracking goes through Lightning's :class:`~lightning.pytorch.loggers.MLFlowLogger`.  Without a
  ``tracking_uri`` the run is stored in ``sqlite:///<output_dir>/mlflow.db`` with artifacts in
  ``<output_dir>/mlruns``; a recipe's ``logger.tracking_uri`` or ``--tracking-uri`` can point at a
  server instead.
* :class:`RunLogging` logs the flattened recipe as params, the resolved recipe as the artifact
  ``recipe.yaml``, the vlzoo version, the git commit and the tags paradigm / backbone / data / task.
* :class:`RecipeInCheckpoint` stores the resolved recipe as a plain YAML string in every
  checkpoint (key :data:`RECIPE_KEY`), so :func:`load_checkpoint` rebuilds the model from the file
  alone - loading with ``torch.load(..., weights_only=True)``: nothing is unpickled.
* :class:`ParameterCount` reports trainable / total parameters when fitting starts.

Faults (docs/faults.md):

* :func:`check_tracking` / :func:`preflight_tracking`: an unreachable or unwritable tracking store
  is a clear :class:`TrackingError` before anything is built.
* :class:`ResilientMLFlowLogger`: losing the server mid-run warns once and keeps the metrics in
  local files; :func:`upload_offline_run` sends them to the server later.
* :class:`FiniteCheckpoints`: a checkpoint of NaN/inf weights is never written, so ``last.ckpt``
  stays the last good one; :class:`AtomicCheckpointIO`: never a half-written file.
* :class:`RandomStateInCheckpoint` and :func:`periodic_checkpoint`: a run killed at any step
  resumes from its last checkpoint and ends as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

import vlzoo
from vlzoo.config import Recipe, RecipeError, flatten, instantiate, recipe_from_yaml

__all__ = [
    "DEFAULT_TRACKING_URI",
    "DEFAULT_EXPERIMENT",
    "RECIPE_KEY",
    "tracking_uri_for",
    "resolve_tracking_uri",
    "make_logger",
    "run_tags",
    "RunLogging",
    "RecipeInCheckpoint",
    "AtomicCheckpointIO",
    "ParameterCount",
    "count_parameters",
    "read_checkpoint",
    "load_checkpoint",
    "backbone_of_checkpoint",
    "export_backbone",
    "find_last_checkpoint",
    "git_commit",
    "TrackingError",
    "check_tracking",
    "temporary_environment",
    "preflight_tracking",
    "uses_mlflow",
    "ResilientMLFlowLogger",
    "upload_offline_run",
    "FiniteCheckpoints",
    "non_finite_weight",
    "RandomStateInCheckpoint",
    "periodic_checkpoint",
]

#: The embedded default: a SQLite file in the output directory (the working directory by default).
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "vlzoo"
#: Checkpoint key holding the resolved recipe (a YAML string).
RECIPE_KEY = "vlzoo_recipe"
VERSION_KEY = "vlzoo_version"
RUN_ID_KEY = "vlzoo_mlflow_run_id"
#: MLflow tag naming the folder of a run's checkpoints (used by ``fit --resume``).
CHECKPOINT_DIR_TAG = "vlzoo.checkpoint_dir"
RECIPE_NAME_TAG = "vlzoo.recipe"


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
    folder = Path(folder) if folder is not None else Path(vlzoo.__file__).resolve().parent
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
    node = dict(recipe.slot("logger") or {"_target_": "lightning.pytorch.loggers.MLFlowLogger"})
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
        node["_target_"] = f"{__name__}.ResilientMLFlowLogger"
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
        "vlzoo.version": vlzoo.__version__,
        RECIPE_NAME_TAG: recipe.name,
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    extra = recipe.data.get("tags") or {}
    if isinstance(extra, Mapping):
        tags.update({str(k): str(v) for k, v in extra.items()})
    return {k: v for k, v in tags.items() if v != ""}


class RunLogging(Callback):
    """Logs the recipe with the run (once, at the first ``setup``): flattened params, the
    resolved YAML as ``recipe.yaml`` and :func:`run_tags`.  On a resumed run, params already
    logged keep their value; a changed one is recorded as the tag ``resume.<key>``."""

    def __init__(self, recipe: Recipe, *, checkpoint_dir: str | Path | None = None) -> None:
        self.recipe = recipe
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        self._done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._done or trainer.global_rank != 0:
            return
        self._done = True
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                try:
                    self._log_mlflow(logger, pl_module)
                except Exception as err:
                    if not isinstance(logger, ResilientMLFlowLogger):
                        raise
                    logger.lose(err)  # the server went away: keep the params locally
                    logger.log_hyperparams({k: _param_text(v) for k, v in flatten(self.recipe.data).items()})

    def _log_mlflow(self, logger: MLFlowLogger, pl_module: L.LightningModule) -> None:
        client = logger.experiment
        run_id = logger.run_id
        existing = client.get_run(run_id).data.params
        params = {k: _param_text(v) for k, v in flatten(self.recipe.data).items()}
        fresh = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        if fresh:
            logger.log_hyperparams(fresh)
        for key, value in changed.items():
            client.set_tag(run_id, f"resume.{key}", value)
        tags = run_tags(self.recipe, pl_module)
        if self.checkpoint_dir is not None:
            tags[CHECKPOINT_DIR_TAG] = self.checkpoint_dir
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        artifact = "recipe.yaml" if not existing else "recipe-resumed.yaml"
        client.log_text(run_id, self.recipe.to_yaml(), artifact)


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class RecipeInCheckpoint(Callback):
    """Stores the resolved recipe (plain YAML text) and the vlzoo version in every checkpoint."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe_yaml = recipe.to_yaml()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RECIPE_KEY] = self.recipe_yaml
        checkpoint[VERSION_KEY] = vlzoo.__version__
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and logger.run_id:
                checkpoint[RUN_ID_KEY] = logger.run_id


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A crash (or SIGKILL) while saving leaves the previous checkpoint of that name intact and no
    half-written file that a resumed run would try to load; ``os.replace`` is atomic on POSIX."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    from vlzoo.backbones.policies import parameter_report

    report = parameter_report(module)
    return report["trainable"], report["total"]


class ParameterCount(Callback):
    """Reports trainable / total parameters when fitting starts (printed and logged as the
    params ``params_trainable`` / ``params_total``)."""

    def __init__(self) -> None:
        self.trainable = 0
        self.total = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainable, self.total = count_parameters(pl_module)
        share = 100.0 * self.trainable / max(self.total, 1)
        rank_zero_info(f"vlzoo: {self.trainable:,} trainable of {self.total:,} parameters ({share:.2f}%)")
        if not trainer.is_global_zero:
            return  # loggers write on rank 0 only (other ranks hold a dummy MLflow experiment)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                counts = {"params_trainable": self.trainable, "params_total": self.total}
                try:
                    existing = logger.experiment.get_run(logger.run_id).data.params
                except Exception as err:
                    if not isinstance(logger, ResilientMLFlowLogger):
                        raise
                    logger.lose(err)
                    existing = {}
                fresh = {k: v for k, v in counts.items() if k not in existing}
                if fresh:
                    logger.log_hyperparams(fresh)
            else:
                logger.log_hyperparams({"params_trainable": self.trainable, "params_total": self.total})


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], Recipe]:
    """The checkpoint dictionary and its embedded recipe, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling refused or file damaged
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        first = first.split(". ", 1)[0].rstrip(".")[:200]  # torch's advice that follows is not ours to give
        raise RecipeError(
            f"checkpoint {path} cannot be loaded with weights_only=True: it is truncated, damaged or not a "
            f"checkpoint written by `vlzoo fit` ({type(err).__name__}: {first}). vlzoo never unpickles "
            "arbitrary objects from a checkpoint; use a last.ckpt or best-*.ckpt of a vlzoo run."
        ) from None
    text = checkpoint.get(RECIPE_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(text, str):
        raise RecipeError(f"checkpoint {path} holds no vlzoo recipe (key '{RECIPE_KEY}'); was it written by vlzoo?")
    return checkpoint, recipe_from_yaml(text, source=f"checkpoint {path}")


def load_checkpoint(
    path: str | Path, *, allow_targets: Sequence[str] = (), strict: bool = True, overrides: Sequence[str] = ()
) -> L.LightningModule:
    """Rebuild a model from a vlzoo checkpoint alone: its embedded recipe builds the model
    (no data, trainer or logger), then the weights are loaded.  The model is in eval mode.

    The checkpoint's ``allow_targets`` are not trusted blindly: each extra prefix it names must
    also be given in ``allow_targets`` (the caller's explicit consent).  ``overrides`` change the
    embedded recipe before building (e.g. ``backbone.checkpoint=null``: the weights come from
    the checkpoint anyway).
    """
    from vlzoo.build import build
    from vlzoo.config import recipe_from_dict

    checkpoint, recipe = read_checkpoint(path)
    if overrides or allow_targets:
        # the checkpoint's own allow_targets count only where the caller confirms them (validate)
        recipe = recipe_from_dict(
            recipe.data, overrides=list(overrides), allow_targets=allow_targets, source=f"checkpoint {path}",
            trust_own_allow_targets=False,
        )
    built = build(recipe, with_data=False, with_trainer=False, with_logger=False)
    if built.model is None:
        raise RecipeError(f"checkpoint {path}: its recipe has no paradigm slot, so there is no model to load")
    built.model.load_state_dict(checkpoint["state_dict"], strict=strict)
    built.model.eval()
    return built.model


def backbone_of_checkpoint(path: str | Path, *, allow_targets: Sequence[str] = ()) -> torch.nn.Module:
    """The trained backbone of a ``vlzoo fit`` checkpoint (any paradigm), rebuilt from the
    recipe it embeds - e.g. a grounding-trained LMM to keep frozen under ``attention_keypoints``
    (``backbone.checkpoint=<that last.ckpt>`` does this).  The recipe's own
    ``backbone.checkpoint`` is not needed: the weights come from the checkpoint."""
    _, recipe = read_checkpoint(path)
    if not isinstance(recipe.data.get("backbone"), Mapping):
        raise RecipeError(f"checkpoint {path}: its recipe '{recipe.name}' has no backbone slot to take an LMM from")
    # the weights are in the file: the other recipe's own starting checkpoint need not exist any more
    unset = ["backbone.checkpoint=null"] if "checkpoint" in recipe.data["backbone"] else []
    model = load_checkpoint(path, allow_targets=allow_targets, overrides=unset)
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "backbone_blob"):
        raise RecipeError(f"checkpoint {path}: its model has no vlzoo backbone to take the weights from")
    return backbone


def export_backbone(checkpoint: str | Path, output: str | Path, *, allow_targets: Sequence[str] = ()) -> Path:
    """Write the backbone of a ``vlzoo fit`` checkpoint as a ``save_backbone`` file (LoRA
    merged, added tokens kept): a small file for ``backbone.checkpoint=`` that no longer needs
    the other recipe.  Written atomically."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    blob = backbone_of_checkpoint(checkpoint, allow_targets=allow_targets).backbone_blob()
    tmp = output.with_name(output.name + ".tmp")
    torch.save(blob, str(tmp))
    tmp.replace(output)
    return output


def find_last_checkpoint(
    *, recipe_name: str, tracking_uri: str, experiment_name: str = DEFAULT_EXPERIMENT
) -> tuple[str, Path]:
    """``(run_id, last.ckpt)`` of the latest run of ``recipe_name`` that has a last checkpoint."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise RecipeError(f"--resume: no experiment '{experiment_name}' at {tracking_uri}, so no run to resume")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{RECIPE_NAME_TAG}` = '{recipe_name}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        folder = run.data.tags.get(CHECKPOINT_DIR_TAG)
        if folder and (Path(folder) / "last.ckpt").is_file():
            return run.info.run_id, Path(folder) / "last.ckpt"
    raise RecipeError(
        f"--resume: no run of recipe '{recipe_name}' with a last checkpoint at {tracking_uri} "
        f"(looked at {len(runs)} run(s))"
    )


# ---------------------------------------------------------------------------------------------- faults


class TrackingError(RecipeError):
    """The MLflow tracking store of a run cannot be reached or written (raised before anything
    is built, so a misspelled or stopped server costs no model build and no training step)."""


#: MLflow logger targets that :func:`make_logger` builds as :class:`ResilientMLFlowLogger`.
MLFLOW_LOGGER_TARGETS = ("lightning.pytorch.loggers.MLFlowLogger", "lightning.pytorch.loggers.mlflow.MLFlowLogger")


def _first_line(err: BaseException, limit: int = 400) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text[:limit]}"


def uses_mlflow(recipe: Recipe) -> bool:
    """True when the run is tracked with MLflow (the ``logger`` slot is absent or an MLFlowLogger)."""
    node = recipe.slot("logger")
    if node is None:
        return True
    return isinstance(node, Mapping) and str(node.get("_target_", "")).rsplit(".", 1)[-1] in (
        "MLFlowLogger",
        "ResilientMLFlowLogger",
    )


def check_tracking(uri: str, *, timeout: int = 10) -> None:
    """Raise :class:`TrackingError` unless the MLflow tracking store at ``uri`` answers.

    One request without MLflow's retries (which wait minutes on a closed port) and with a
    ``timeout`` in seconds; for a SQLite URI this opens (and creates) the database file."""
    from mlflow.tracking import MlflowClient

    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout))}
    try:
        with temporary_environment(**quick):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
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
    ``offline_dir``.
    """

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
            f"metrics are now written to {folder / 'metrics.jsonl'} (vlzoo.runs.upload_offline_run sends them "
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
        if self.lost is None:
            try:
                super().log_metrics(metrics, step)
                return
            except Exception as err:  # noqa: BLE001 - whatever broke, the run must go on
                self.lose(err, step=step)
        now = int(time.time() * 1000)
        lines = [
            json.dumps({"key": self._prefix + "-" + k if self._prefix else k, "value": float(v), "step": int(step or 0),
                        "timestamp": now})
            for k, v in metrics.items()
            if not isinstance(v, str)
        ]
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
        if self.lost is None:
            try:
                super().finalize(status)
                return
            except Exception as err:  # noqa: BLE001
                self.lose(err)
        mlflow_status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status)
        self._write_run_record(status=mlflow_status)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
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
    from mlflow.tracking import MlflowClient

    folder = Path(folder)
    record_path = folder / "run.json"
    if not record_path.is_file():
        raise RecipeError(f"{folder} holds no run.json: not a folder written by vlzoo's offline fallback")
    record = json.loads(record_path.read_text())
    client = MlflowClient(tracking_uri=tracking_uri or record["tracking_uri"])
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


def non_finite_weight(module: torch.nn.Module) -> str | None:
    """The name of the first trainable parameter holding NaN/inf (or float buffer holding NaN)."""
    for name, param in module.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
            return name
    for name, buffer in module.named_buffers():
        # buffers may hold -inf on purpose (attention masks); NaN is never intended
        if buffer.is_floating_point() and bool(torch.isnan(buffer).any()):
            return name
    return None


class FiniteCheckpoints(Callback):
    """Refuses to write a checkpoint of non-finite weights: training stops with a
    ``FloatingPointError`` naming the tensor and the step, and the previous ``last.ckpt`` (the
    last good one) stays as it was."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        name = non_finite_weight(pl_module)
        bad = name is not None
        if trainer.world_size > 1:
            # saving is collective (every rank is here): all ranks must stop, or none
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise FloatingPointError(
                f"weights became non-finite at global step {trainer.global_step} "
                f"({name or 'a weight of another rank'} holds NaN/inf); "
                "not writing a checkpoint of them, so the last good checkpoint is kept. Lower the learning "
                "rate or enable gradient clipping (trainer.gradient_clip_val)."
            )


def _random_states() -> dict[str, Any]:
    import random

    import numpy as np

    np_state = np.random.get_state()
    py_state = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype("int64")),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(states: Mapping[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStateInCheckpoint(Callback):
    """Stores the global random states (torch, NumPy, Python, CUDA) in every checkpoint and puts
    them back when the resumed run starts training, so dropout and other random draws continue
    as they would have in an uninterrupted run (together with the datamodule's resumable
    shuffle this makes a resumed run equal to an uninterrupted one in deterministic mode)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"random_states": _random_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("random_states")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            _set_random_states(self._pending)
            self._pending = None


def periodic_checkpoint(folder: str | Path, every_n_train_steps: int) -> Any:
    """A ``ModelCheckpoint`` refreshing ``last.ckpt`` every ``every_n_train_steps`` optimizer
    steps (recipe key ``checkpoint.every_n_train_steps``): what a killed run resumes from."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(
        dirpath=folder,
        every_n_train_steps=int(every_n_train_steps),
        save_top_k=0,
        save_last=True,
        monitor=None,
        enable_version_counter=False,  # shares last.ckpt with the best/last checkpoint of build.py
    )
