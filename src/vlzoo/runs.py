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
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

import vlzoo
from vlzoo.config import DEFAULT_ALLOWED_PREFIXES, Recipe, RecipeError, flatten, instantiate, recipe_from_yaml

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
    "find_last_checkpoint",
    "git_commit",
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
        "artifact_location": (Path(output_dir).resolve() / "mlruns").as_uri(),
    }
    if run_id is not None:
        node["run_id"] = run_id
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
                self._log_mlflow(logger, pl_module)

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
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                existing = logger.experiment.get_run(logger.run_id).data.params
                counts = {"params_trainable": self.trainable, "params_total": self.total}
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
        raise RecipeError(
            f"checkpoint {path} cannot be loaded with weights_only=True ({type(err).__name__}: {err}). "
            "vlzoo never unpickles arbitrary objects from a checkpoint."
        ) from None
    text = checkpoint.get(RECIPE_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(text, str):
        raise RecipeError(f"checkpoint {path} holds no vlzoo recipe (key '{RECIPE_KEY}'); was it written by vlzoo?")
    return checkpoint, recipe_from_yaml(text, source=f"checkpoint {path}")


def load_checkpoint(
    path: str | Path, *, allow_targets: Sequence[str] = (), strict: bool = True
) -> L.LightningModule:
    """Rebuild a model from a vlzoo checkpoint alone: its embedded recipe builds the model
    (no data, trainer or logger), then the weights are loaded.  The model is in eval mode.

    The checkpoint's ``allow_targets`` are not trusted blindly: each extra prefix it names must
    also be given in ``allow_targets`` (the caller's explicit consent).
    """
    from vlzoo.build import build

    checkpoint, recipe = read_checkpoint(path)
    asked = [p for p in recipe.data.get("allow_targets") or [] if p not in DEFAULT_ALLOWED_PREFIXES]
    unconfirmed = [p for p in asked if p not in allow_targets]
    if unconfirmed:
        raise RecipeError(
            f"checkpoint {path} asks to allow targets under {', '.join(unconfirmed)}; if you trust it, "
            f"pass allow_targets={unconfirmed!r} (command line: --allow-target {' --allow-target '.join(unconfirmed)})"
        )
    built = build(recipe, with_data=False, with_trainer=False, with_logger=False)
    if built.model is None:
        raise RecipeError(f"checkpoint {path}: its recipe has no paradigm slot, so there is no model to load")
    built.model.load_state_dict(checkpoint["state_dict"], strict=strict)
    built.model.eval()
    return built.model


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
