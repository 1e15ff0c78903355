"""Lightning callbacks and checkpoint IO of a vlzoo run (below :mod:`vlzoo.build`, which adds
them to every trainer).

* :class:`RunLogging` logs the flattened recipe as params, the resolved recipe as the artifact
  ``recipe.yaml`` and :func:`~vlzoo.tracking.run_tags`.
* :class:`RecipeInCheckpoint` stores the resolved recipe as a plain YAML string in every
  checkpoint (key :data:`RECIPE_KEY`), so :func:`vlzoo.checkpoints.load_checkpoint` rebuilds the
  model from the file alone.
* :class:`ParameterCount` reports trainable / total parameters when fitting starts;
  :class:`CpuTimeCurve` logs the CPU seconds since ``fit`` began at every validation.

Faults (docs/faults.md):

* :class:`FiniteCheckpoints`: a checkpoint of NaN/inf weights is never written, so ``last.ckpt``
  stays the last good one; :class:`AtomicCheckpointIO`: never a half-written file.
* :class:`RandomStateInCheckpoint` and :func:`periodic_checkpoint`: a run killed at any step
  resumes from its last checkpoint and ends as an uninterrupted run would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from vlzoo.config import Recipe, flatten
from vlzoo.tracking import CHECKPOINT_DIR_TAG, ResilientMLFlowLogger, run_tags
from vlzoo.version import __version__

__all__ = [
    "RECIPE_KEY",
    "VERSION_KEY",
    "RUN_ID_KEY",
    "CPU_CURVE_KEY",
    "RunLogging",
    "RecipeInCheckpoint",
    "AtomicCheckpointIO",
    "ParameterCount",
    "count_parameters",
    "FiniteCheckpoints",
    "non_finite_weight",
    "RandomStateInCheckpoint",
    "periodic_checkpoint",
    "CpuTimeCurve",
]

#: Checkpoint key holding the resolved recipe (a YAML string).
RECIPE_KEY = "vlzoo_recipe"
#: Checkpoint key holding the vlzoo version that wrote it.
VERSION_KEY = "vlzoo_version"
#: Checkpoint key holding the MLflow run id of the run that wrote it (``fit --resume-from``).
RUN_ID_KEY = "vlzoo_mlflow_run_id"
#: The metric :class:`CpuTimeCurve` logs (CPU seconds since ``fit`` began).
CPU_CURVE_KEY = "cost/cpu_seconds"


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
        checkpoint[VERSION_KEY] = __version__
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


class CpuTimeCurve(Callback):
    """The CPU seconds of this process since ``fit`` began, logged at every validation through
    the module's logger (so at the very steps of the validation figures), so a study report can
    say how much compute a validation figure cost (time-to-accuracy).  CPU time, not wall time:
    it does not depend on what else the machine runs."""

    def __init__(self) -> None:
        self.start = time.process_time()
        self.seconds = 0.0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.process_time()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self.seconds = time.process_time() - self.start
        pl_module.log(CPU_CURVE_KEY, self.seconds, add_dataloader_idx=False)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.seconds = time.process_time() - self.start
