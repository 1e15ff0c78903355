"""One run session: ``fit`` / ``validate`` / ``test`` / ``predict`` of a recipe, the same from
the command line (``vlzoo fit ...``), a study's cells and its stage 0.

A :class:`RunSession` does, in this order and once each, what every run goes through:

1. the recipe is validated (every target reviewed, every argument bound, and the consent check:
   a stored recipe's ``allow_targets`` count only where the caller confirms them,
   :func:`vlzoo.config.check_trust`), and the slots the verb needs are there;
2. the tracking preflight: an MLflow store that cannot be used is a
   :class:`~vlzoo.tracking.TrackingError` before anything is built
   (:func:`~vlzoo.tracking.preflight_tracking`);
3. ``resume`` (``fit``): ``"last"`` (the latest run of the recipe with a last checkpoint), a run
   id or a checkpoint file; the run that wrote the checkpoint is continued and must be in the
   store;
4. the weight check: a checkpoint (resumed, or ``checkpoint`` for the other verbs) that is
   missing, damaged, not vlzoo's or does not fit the model the recipe builds is refused before
   the logger opens a run (:func:`~vlzoo.checkpoints.check_weights_fit`);
5. the split the verb runs on must be in the recipe's data;
6. :func:`vlzoo.build.build`, then the Lightning call - with one handling of what can go wrong in
   it: non-finite loss or weights stop training with :class:`TrainingStopped` (naming the last good
   checkpoint), Ctrl-C marks the run ``KILLED`` and raises :class:`RunInterrupted`, a validation
   interval longer than an epoch is a :class:`~vlzoo.config.RecipeError` naming its keys.

A session builds once: ``session.fit()`` then ``session.test()`` tests the trained model in memory
(what a study cell does); ``session.prepare()`` runs the checks and the build ahead of the verb.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from vlzoo.allocator import keep_freed_memory
from vlzoo.build import Built, as_recipe, build
from vlzoo.checkpoints import CheckpointWeights, check_weights_fit, checkpoint_weights, find_last_checkpoint
from vlzoo.config import Recipe, RecipeError, validate
from vlzoo.tracking import (
    CHECKPOINT_DIR_TAG,
    ResilientMLFlowLogger,
    find_run,
    preflight_tracking,
    resolve_tracking_uri,
    run_in_store,
)

__all__ = ["RunSession", "RunOutcome", "TrainingStopped", "RunInterrupted", "VERBS", "check_split", "resume_target"]

#: The verbs of a session and the data split each runs on.
VERBS: dict[str, str] = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}


class TrainingStopped(FloatingPointError):
    """Training stopped because the loss or the weights became non-finite; the message says why
    and which checkpoint (the last good one) a ``--resume`` continues from."""

    def __init__(self, message: str, *, last_checkpoint: Path | None, step: int | None) -> None:
        super().__init__(message)
        self.last_checkpoint = last_checkpoint
        self.step = step


class RunInterrupted(Exception):
    """Ctrl-C stopped ``fit`` (Lightning's graceful shutdown); the run is marked ``KILLED``.
    ``built`` says what was saved (its ``checkpoint_dir``) and at which step (its trainer)."""

    def __init__(self, built: Built) -> None:
        super().__init__(f"interrupted (Ctrl-C) at global step {built.trainer.global_step}")
        self.built = built


@dataclass
class RunOutcome:
    """What a session's verb did: the built parts, the tracking URI, and for ``validate`` /
    ``test`` the figures Lightning returned (one dict per dataloader)."""

    verb: str
    built: Built
    tracking_uri: str
    results: list[dict[str, float]] = field(default_factory=list)

    @property
    def run_id(self) -> str | None:
        return self.built.run_id

    @property
    def lost_server(self) -> str | None:
        """Where the metrics went when the tracking server was lost mid-run (``None`` if not)."""
        logger = self.built.logger
        if isinstance(logger, ResilientMLFlowLogger) and logger.lost:
            return (f"the tracking server was lost at step {logger.lost_at_step} ({logger.lost}); metrics from then "
                    f"on are in {logger.offline_folder / 'metrics.jsonl'}")
        return None


def check_split(recipe: Recipe, verb: str) -> None:
    """The split a verb runs on, missing from a VLDataModule recipe: said before anything is built
    or a run is opened (the datamodule would say the same once asked for the dataloader)."""
    from vlzoo.config import locate
    from vlzoo.data import VLDataModule

    split = VERBS[verb]
    node = recipe.slot("data")
    if locate(node["_target_"], recipe.allowed_prefixes) is VLDataModule and not node.get(split):
        raise VLDataModule.missing_split(split)


def resume_target(value: str, recipe_name: str, tracking_uri: str) -> tuple[str | None, Path]:
    """``(run_id or None, checkpoint path)`` for ``resume``: ``"last"`` (the latest run of the
    recipe), a checkpoint file, or an MLflow run id (its last checkpoint)."""
    if value == "last":
        return find_last_checkpoint(recipe_name=recipe_name, tracking_uri=tracking_uri)
    if Path(value).is_file():
        return None, Path(value)
    if value.endswith(".ckpt") or "/" in value:
        raise RecipeError(f"--resume-from {value}: checkpoint file not found")
    run = find_run(tracking_uri, value)
    if run is None:
        raise RecipeError(f"--resume {value}: neither a checkpoint file nor a run at {tracking_uri}")
    folder = run.data.tags.get(CHECKPOINT_DIR_TAG)
    if not folder or not (Path(folder) / "last.ckpt").is_file():
        raise RecipeError(f"--resume {value}: the run has no last checkpoint (tag {CHECKPOINT_DIR_TAG}={folder})")
    return value, Path(folder) / "last.ckpt"


def _raise_if_interval_too_long(trainer: Any, recipe: Recipe, err: BaseException) -> None:
    """Lightning refuses a ``val_check_interval`` longer than an epoch when validation is also
    counted in epochs (``check_val_every_n_epoch`` set): said with the keys and the epoch length
    of one process instead of its traceback."""
    interval, every = trainer.val_check_interval, trainer.check_val_every_n_epoch
    batches = getattr(trainer.fit_loop, "max_batches", None)
    if not (isinstance(interval, int) and every is not None and isinstance(batches, int) and interval > batches):
        return
    raise RecipeError(
        f"recipe key trainer.val_check_interval ({interval}, set in {recipe.source('trainer.val_check_interval')}) "
        f"is longer than an epoch: each of the {trainer.world_size} process(es) gets {batches} training batches per "
        f"epoch, and trainer.check_val_every_n_epoch ({every}, set in {recipe.source('trainer.check_val_every_n_epoch')}) "
        "makes Lightning count the interval inside each epoch. Leave check_val_every_n_epoch out (or set it to null) "
        f"to validate every {interval} batches across epochs, or set trainer.val_check_interval to at most {batches}."
    ) from err


def _checkpoint_step(path: Path) -> int | None:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")


class RunSession:
    """One run of a recipe (see the module docstring for what every verb goes through).

    Args:
        recipe: a :class:`~vlzoo.config.Recipe`, a recipe file or shipped name, or a mapping.
        overrides: command-line style overrides, applied to ``recipe``.
        allow_targets: module prefixes trusted on purpose (the consent of :func:`~vlzoo.config.check_trust`).
        output_dir: where the default MLflow store, ``mlruns/`` and ``checkpoints/`` go.
        tracking_uri: MLflow tracking URI, winning over the recipe's ``logger.tracking_uri``.
        run_id: log into this existing MLflow run (a study's cell run).
        checkpoint: the weights ``validate`` / ``test`` / ``predict`` use (``None``: the recipe's).
        resume: ``fit`` only: ``"last"``, a run id or a checkpoint file to continue from.
        keep_raw_images: ask the datamodule to keep raw images (overlays, galleries).
        callbacks: more Lightning callbacks (a prediction writer, a CPU-time curve).
    """

    def __init__(
        self,
        recipe: Recipe | str | Path | Mapping[str, Any],
        *,
        overrides: Sequence[str] = (),
        allow_targets: Sequence[str] = (),
        output_dir: str | Path = ".",
        tracking_uri: str | None = None,
        run_id: str | None = None,
        checkpoint: str | Path | None = None,
        resume: str | None = None,
        keep_raw_images: bool | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.recipe = as_recipe(recipe, overrides=overrides, allow_targets=allow_targets)
        self.output_dir = output_dir
        self.given_tracking_uri = tracking_uri
        self.run_id = run_id
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.resume = resume
        self.keep_raw_images = keep_raw_images
        self.callbacks = list(callbacks)
        self.tracking_uri = resolve_tracking_uri(self.recipe, output_dir=output_dir, tracking_uri=tracking_uri)
        self.built: Built | None = None
        self._verb: str | None = None
        self._prepared: str | None = None  # the verb prepare() built for, not run yet

    # ------------------------------------------------------------------ the verbs
    def prepare(self, verb: str = "fit") -> Built:
        """Run the checks and the build for ``verb`` now (the verb itself then reuses them), so a
        caller can time the Lightning call alone (a study cell's ``cost/train_seconds``)."""
        if verb not in VERBS:
            raise ValueError(f"RunSession verbs are {', '.join(VERBS)}, not {verb!r}")
        if self.built is None:
            self._prepare(verb)
            self._prepared = verb
        return self.built

    def fit(self) -> RunOutcome:
        """Train (continuing ``resume`` when given)."""
        keep_freed_memory()  # reuse freed tensor buffers instead of page-faulting them back every step
        built, ckpt = self._prepare("fit")
        trainer = built.trainer
        try:
            trainer.fit(built.model, datamodule=built.datamodule, ckpt_path=ckpt, weights_only=True)
        except ValueError as err:
            _raise_if_interval_too_long(trainer, self.recipe, err)
            raise
        except SystemExit:
            if not trainer.interrupted:
                raise
            self._mark_killed(built)  # Lightning turned Ctrl-C into SystemExit(1) and marked the run FAILED
            raise RunInterrupted(built) from None
        except FloatingPointError as err:  # the loss or the weights became NaN/inf (paradigms/base.py, callbacks.py)
            raise self._stopped(built, err) from err
        return RunOutcome("fit", built, self.tracking_uri)

    def validate(self) -> RunOutcome:
        """Run the validation split(s); ``results`` holds one dict of figures per split."""
        return self._evaluate("validate")

    def test(self) -> RunOutcome:
        """Run the test split(s); after :meth:`fit`, on the model just trained."""
        return self._evaluate("test")

    def predict(self) -> RunOutcome:
        """Run the predict split through the session's callbacks (e.g. a
        :class:`~vlzoo.predictions.PredictionWriter`); nothing is kept in memory."""
        built, ckpt = self._prepare("predict")
        built.trainer.predict(built.model, datamodule=built.datamodule, ckpt_path=ckpt, weights_only=True,
                              return_predictions=False)
        return RunOutcome("predict", built, self.tracking_uri)

    # ------------------------------------------------------------------ the steps
    def _evaluate(self, verb: str) -> RunOutcome:
        built, ckpt = self._prepare(verb)
        run = built.trainer.validate if verb == "validate" else built.trainer.test
        results = run(built.model, datamodule=built.datamodule, ckpt_path=ckpt, weights_only=True, verbose=False)
        return RunOutcome(verb, built, self.tracking_uri, results=list(results))

    def _prepare(self, verb: str) -> tuple[Built, str | None]:
        """The checks of the module docstring, then the build (once per session); returns the
        built parts and the checkpoint Lightning starts from."""
        if self.built is not None and self._prepared == verb:
            # prepare() ran the checks and the build for this verb: start as it left them
            self._prepared = None
            return self.built, None if self.checkpoint is None else str(self.checkpoint)
        if self.built is not None:
            check_split(self.recipe, verb)
            # after fit the model in memory is the trained one; a given checkpoint is still used
            ckpt = None if self._verb == "fit" or self.checkpoint is None else str(self.checkpoint)
            self._verb = verb
            return self.built, ckpt
        recipe = self.recipe
        validate(recipe)  # includes the consent check (check_trust)
        for slot in ("paradigm", "data"):
            if recipe.slot(slot) is None:
                raise RecipeError(f"vlzoo {verb} needs a '{slot}' slot, but recipe {recipe.path or recipe.name} has none")
        # an unreachable tracking store fails now: before resume asks it, before anything is built
        preflight_tracking(recipe, output_dir=self.output_dir, tracking_uri=self.given_tracking_uri)
        run_id, ckpt_path = self.run_id, self.checkpoint
        resuming = verb == "fit" and self.resume is not None
        if resuming:
            found_run, ckpt_path = resume_target(self.resume, recipe.name, self.tracking_uri)
            run_id = run_id or found_run
        # a missing, damaged or foreign checkpoint is refused before anything is built or tracked
        weights: CheckpointWeights | None = checkpoint_weights(ckpt_path) if ckpt_path is not None else None
        if resuming and run_id is None and weights is not None:
            run_id = weights.run_id
        if resuming and run_id is not None and not run_in_store(self.tracking_uri, run_id):
            raise RecipeError(
                f"--resume-from {ckpt_path}: the checkpoint belongs to MLflow run {run_id}, which is not in the "
                f"tracking store {self.tracking_uri}; pass the --output-dir (or --tracking-uri) of the run that wrote it"
            )
        check_split(recipe, verb)
        self.built = build(
            recipe,
            output_dir=self.output_dir,
            tracking_uri=self.tracking_uri,
            run_id=run_id,
            keep_raw_images=self.keep_raw_images,
            extra_callbacks=self.callbacks,
            # a checkpoint that does not fit the model is refused before the logger opens a run
            check_model=None if weights is None else (
                lambda b: check_weights_fit(weights, b.model, recipe, resuming=verb == "fit")),
            checked=True,
        )
        self.checkpoint, self._verb = ckpt_path, verb
        return self.built, None if ckpt_path is None else str(ckpt_path)

    def _stopped(self, built: Built, err: FloatingPointError) -> TrainingStopped:
        last = built.checkpoint_dir / "last.ckpt"
        if last.is_file():
            step = _checkpoint_step(last)
            kept = f"last good checkpoint: {last} (step {step}); `vlzoo fit ... --resume` continues from it"
            return TrainingStopped(f"{err}\n{kept}", last_checkpoint=last, step=step)
        return TrainingStopped(f"{err}\nno checkpoint had been written yet", last_checkpoint=None, step=None)

    @staticmethod
    def _mark_killed(built: Built) -> None:
        if built.run_id and built.trainer.is_global_zero:
            try:
                built.logger.experiment.set_terminated(built.run_id, "KILLED")
            except Exception:  # noqa: BLE001 - a lost tracking server must not hide what was saved
                pass
