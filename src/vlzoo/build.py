"""``vlzoo.build(recipe)``: the one place that wires a recipe's slots together.

Order and injection (by parameter name, only where the recipe leaves the parameter out and the
target's signature has it - at every depth of the slot's node):

1. ``backbone``.
2. ``evaluator``.
3. ``optimizer`` and ``scheduler``, normally partials (``_partial_: true``).
4. ``paradigm`` <- ``backbone``, ``evaluator``, ``optimizer``, ``scheduler`` (when built) and,
   into its nested decoder nodes, the sizes of the backbone interface
   (:class:`~vlzoo.backbones.Backbone`): parameters ``hidden_size``, ``vision_dim`` (from
   ``vision_width``), ``feature_grid``, ``input_size`` (:data:`BACKBONE_ATTRIBUTES`).  The
   paradigms themselves read their sizes from the backbone.  The backbone's special tokens the paradigm's ``answer_format`` declares are then
   added if the paradigm did not add them itself.
5. ``data`` <- ``tokenizer`` (``backbone.tokenizer``), ``answer_format`` (``model.answer_format``),
   ``image_mean`` / ``image_std`` / ``image_size`` (``backbone.data_config`` ``mean`` / ``std`` /
   ``input_size``), ``image_transform`` (``data_config["transform"]``: a backbone's own frame, e.g.
   Qwen's ``smart_resize``), ``seed`` (the recipe's), ``keep_raw_images`` (when asked for overlays).
6. ``logger`` (an MLflow logger when the slot is absent, see :mod:`vlzoo.tracking`).
7. ``trainer`` (``lightning.Trainer()`` when absent) <- ``logger``, ``default_root_dir``,
   ``check_val_every_n_epoch: None`` when ``val_check_interval`` is a whole number of batches
   (validation by step across epochs, :func:`step_based_validation`),
   ``enable_progress_bar`` (off when ``CI`` is set or stdout is not a terminal), ``plugins``
   (:class:`~vlzoo.callbacks.AtomicCheckpointIO`: checkpoints are renamed into place) and
   ``callbacks``: the recipe's own plus a :class:`~lightning.pytorch.callbacks.ModelCheckpoint`
   (last + best; also every ``checkpoint.every_n_train_steps`` steps),
   :class:`~vlzoo.callbacks.RecipeInCheckpoint`, :class:`~vlzoo.callbacks.RandomStateInCheckpoint`,
   :class:`~vlzoo.callbacks.FiniteCheckpoints`, :class:`~vlzoo.callbacks.RunLogging`,
   :class:`~vlzoo.callbacks.ParameterCount` and, without a progress bar,
   :class:`~vlzoo.terminal.ValidationLine` (a line per validation).  Before anything is
   built, an MLflow tracking store that cannot be reached fails
   (:func:`~vlzoo.tracking.preflight_tracking`).

Only ``paradigm`` is needed to build a model; ``fit``/``validate``/``test``/``predict`` also
need ``data``.  Every other slot may be absent.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, MLFlowLogger

from vlzoo.backbones.interface import SIZE_PARAMETERS
from vlzoo.callbacks import (
    AtomicCheckpointIO,
    FiniteCheckpoints,
    ParameterCount,
    RandomStateInCheckpoint,
    RecipeInCheckpoint,
    RunLogging,
    periodic_checkpoint,
)
from vlzoo.config import Recipe, RecipeError, instantiate, load_recipe, recipe_from_dict, validate
from vlzoo.terminal import ValidationLine, quiet_third_party
from vlzoo.tracking import make_logger, preflight_tracking

__all__ = ["Built", "build", "as_recipe", "progress_bar_wanted", "step_based_validation", "BACKBONE_ATTRIBUTES"]

#: Sizes injected into the paradigm slot's nodes: parameter name -> backbone interface property.
BACKBONE_ATTRIBUTES: dict[str, str] = dict(SIZE_PARAMETERS)


@dataclass
class Built:
    """Everything :func:`build` made from a recipe (``None`` for what it did not build)."""

    recipe: Recipe
    model: L.LightningModule | None = None
    datamodule: L.LightningDataModule | None = None
    trainer: L.Trainer | None = None
    logger: Logger | None = None
    backbone: Any = None
    evaluator: Any = None
    optimizer: Any = None
    scheduler: Any = None
    checkpoint_dir: Path | None = None
    callbacks: list[Callback] = field(default_factory=list)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, when the run is tracked with MLflow."""
        return self.logger.run_id if isinstance(self.logger, MLFlowLogger) else None


def as_recipe(
    recipe: Recipe | str | Path | Mapping[str, Any],
    *,
    overrides: Sequence[str] = (),
    allow_targets: Sequence[str] = (),
) -> Recipe:
    """A :class:`Recipe` from a recipe, a recipe file / name, or a plain mapping."""
    if isinstance(recipe, Recipe):
        if overrides or allow_targets:
            trusted = [*recipe.confirmed, *(p for p in allow_targets if p not in recipe.confirmed)]
            return recipe_from_dict(recipe.data, overrides=overrides, allow_targets=trusted, path=recipe.path,
                                    trust_own_allow_targets=False)
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(recipe, overrides=overrides, allow_targets=allow_targets)
    return load_recipe(recipe, overrides, allow_targets=allow_targets)


def progress_bar_wanted() -> bool:
    """Lightning's progress bar on a terminal, quiet in CI (``CI`` set) or when piped."""
    return not os.environ.get("CI") and sys.stdout.isatty()


def _injectable(obj: Any, names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        try:
            value = getattr(obj, name, None)
        except ValueError:  # undefined for this backbone (a grid per image): a part reading it says why
            continue
        if value is not None:
            out[name] = value
    return out


def _add_special_tokens(backbone: Any, model: Any) -> None:
    """Add the special tokens of the paradigm's answer format to the backbone, unless the
    paradigm already did (tokens already in the vocabulary are skipped)."""
    add = getattr(backbone, "add_special_tokens", None)
    tokens = getattr(getattr(model, "answer_format", None), "special_tokens", None)
    if add is None or not tokens:
        return
    tokenizer = getattr(backbone, "tokenizer", None)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    missing = [t for t in tokens if t not in vocab]
    if missing:
        add(missing)


def build(
    recipe: Recipe | str | Path | Mapping[str, Any],
    *,
    overrides: Sequence[str] = (),
    allow_targets: Sequence[str] = (),
    with_data: bool = True,
    with_trainer: bool = True,
    with_logger: bool = True,
    output_dir: str | Path = ".",
    tracking_uri: str | None = None,
    run_id: str | None = None,
    keep_raw_images: bool | None = None,
    extra_callbacks: Sequence[Callback] = (),
    check_model: Callable[[Built], None] | None = None,
    checked: bool = False,
) -> Built:
    """Validate a recipe, then build its slots in order (see the module docstring).

    Args:
        recipe: a :class:`Recipe`, a recipe file or shipped name, or a plain mapping.
        overrides: command-line style overrides (``trainer=cpu``, ``optimizer.lr=1e-4``).
        allow_targets: module prefixes trusted on purpose beyond the reviewed callables (recorded in
            the recipe's ``allow_targets``; the recipe's own ``allow_targets`` count only where listed here).
        with_data: build the ``data`` slot.
        with_trainer: build the trainer (and, with ``with_logger``, the logger).
        with_logger: track the run (the recipe's logger, MLflow by default).
        output_dir: where the default MLflow store, ``mlruns/`` and ``checkpoints/`` go.
        tracking_uri: MLflow tracking URI, winning over the recipe's.
        run_id: continue this MLflow run (``fit --resume``).
        keep_raw_images: ask the datamodule to keep raw uint8 images (for overlays).
        extra_callbacks: more Lightning callbacks for the trainer.
        check_model: called with the model and data built, before the logger opens a run: a
            refusal it raises (say, a checkpoint that does not fit the model) leaves no run.
        checked: the recipe is validated and its tracking store checked already (a
            :class:`~vlzoo.session.RunSession` does both once, before it resolves ``--resume``).
    """
    recipe = as_recipe(recipe, overrides=overrides, allow_targets=allow_targets)
    if not checked:
        validate(recipe)
    if with_trainer and with_logger and not checked:
        # an unreachable / unwritable tracking store fails here, before any model is built
        preflight_tracking(recipe, output_dir=output_dir, tracking_uri=tracking_uri)
    allow = recipe.allowed_prefixes
    built = Built(recipe=recipe)
    if recipe.seed is not None:
        L.seed_everything(recipe.seed, workers=True, verbose=False)

    def make(slot: str, inject: Mapping[str, Any] | None = None) -> Any:
        node = recipe.slot(slot)
        return None if node is None else instantiate(node, inject=inject, allow=allow, key=slot)

    built.backbone = make("backbone")
    built.evaluator = make("evaluator")
    built.optimizer = make("optimizer")
    built.scheduler = make("scheduler")
    paradigm_inject: dict[str, Any] = {
        name: value
        for name, value in (
            ("backbone", built.backbone),
            ("evaluator", built.evaluator),
            ("optimizer", built.optimizer),
            ("scheduler", built.scheduler),
        )
        if value is not None
    }
    if built.backbone is not None:
        sizes = _injectable(built.backbone, list(BACKBONE_ATTRIBUTES.values()))
        paradigm_inject.update({p: sizes[a] for p, a in BACKBONE_ATTRIBUTES.items() if a in sizes})
    built.model = make("paradigm", paradigm_inject)
    if built.model is not None:
        if not isinstance(built.model, L.LightningModule):
            raise RecipeError(
                f"recipe key paradigm._target_ (set in {recipe.source('paradigm._target_')}): "
                f"{recipe.get('paradigm._target_')} built a {type(built.model).__name__}, not a LightningModule"
            )
        if built.backbone is not None:
            _add_special_tokens(built.backbone, built.model)

    if with_data:
        built.datamodule = make("data", _data_injection(recipe, built, keep_raw_images))
        if keep_raw_images is not None and hasattr(built.datamodule, "keep_raw_images"):
            built.datamodule.keep_raw_images = keep_raw_images

    if check_model is not None:
        check_model(built)
    if with_trainer:
        if with_logger:
            built.logger = make_logger(recipe, output_dir=output_dir, tracking_uri=tracking_uri, run_id=run_id)
        try:
            built.trainer = _make_trainer(recipe, built, output_dir=output_dir, extra_callbacks=extra_callbacks)
        except BaseException:
            # the logger may have opened a new run already: it failed, it is not left RUNNING
            if run_id is None and built.logger is not None:
                built.logger.finalize("failed")
            raise
    return built


def _data_injection(recipe: Recipe, built: Built, keep_raw_images: bool | None) -> dict[str, Any]:
    inject: dict[str, Any] = {}
    backbone, model = built.backbone, built.model
    if getattr(backbone, "tokenizer", None) is not None:
        inject["tokenizer"] = backbone.tokenizer
    if getattr(model, "answer_format", None) is not None:
        inject["answer_format"] = model.answer_format
    data_config = getattr(backbone, "data_config", None)
    if isinstance(data_config, Mapping):
        for name, key in (("image_mean", "mean"), ("image_std", "std"), ("image_size", "input_size")):
            if data_config.get(key) is not None:
                inject[name] = data_config[key]
        if data_config.get("transform") is not None:  # the backbone's own frame (Qwen's smart_resize)
            inject["image_transform"] = data_config["transform"]
    if "image_size" not in inject and "image_transform" not in inject and getattr(backbone, "input_size", None) is not None:
        inject["image_size"] = backbone.input_size
    if recipe.seed is not None:
        inject["seed"] = recipe.seed
    if keep_raw_images is not None:
        inject["keep_raw_images"] = keep_raw_images
    return inject


def _checkpoint_callback(recipe: Recipe, built: Built, folder: Path) -> ModelCheckpoint:
    settings = recipe.data.get("checkpoint") or {}
    if not isinstance(settings, Mapping):
        raise RecipeError(
            f"recipe key checkpoint (set in {recipe.source('checkpoint')}) must be a mapping with "
            "monitor / mode / save_top_k / every_n_train_steps"
        )
    unknown = set(settings) - {"monitor", "mode", "save_top_k", "every_n_train_steps"}
    if unknown:
        key = sorted(unknown)[0]
        raise RecipeError(
            f"recipe key checkpoint.{key} (set in {recipe.source('checkpoint.' + key)}) is not a checkpoint "
            "setting (monitor, mode, save_top_k, every_n_train_steps)"
        )
    monitor = settings.get("monitor", getattr(built.model, "monitor", None))
    mode = settings.get("mode", getattr(built.model, "monitor_mode", "max" if monitor else "min"))
    return ModelCheckpoint(
        dirpath=folder,
        filename="best-{epoch}-{step}",
        monitor=monitor,
        mode=mode,
        save_last=True,
        save_top_k=int(settings.get("save_top_k", 1)),
        auto_insert_metric_name=False,
        # last.ckpt is shared with the periodic checkpoint (checkpoint.every_n_train_steps): overwrite, no last-v1
        enable_version_counter=False,
    )


def _periodic_checkpoints(recipe: Recipe, folder: Path) -> list[Callback]:
    """``checkpoint.every_n_train_steps: N``: also refresh ``last.ckpt`` every N steps (what a
    killed run resumes from, see docs/faults.md)."""
    every = (recipe.data.get("checkpoint") or {}).get("every_n_train_steps")
    if every is None or every == 0:
        return []
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise RecipeError(
            f"recipe key checkpoint.every_n_train_steps (set in {recipe.source('checkpoint.every_n_train_steps')}) "
            f"must be a whole number of optimizer steps (0 or left out: only at validation), got {every!r}"
        )
    return [periodic_checkpoint(folder, every)]


def step_based_validation(node: dict[str, Any]) -> dict[str, Any]:
    """A trainer node whose ``val_check_interval`` is a whole number of batches validates every
    that many batches counted across epochs (``check_val_every_n_epoch: None``), unless the
    recipe sets ``check_val_every_n_epoch`` itself.

    Lightning otherwise counts the interval inside each epoch and refuses one longer than an
    epoch - which a step-based recipe meets as soon as its epoch is split over more processes
    (``trainer.devices=2``) or its dataset is made smaller."""
    interval = node.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool) and "check_val_every_n_epoch" not in node:
        node = {**node, "check_val_every_n_epoch": None}
    return node


def _make_trainer(
    recipe: Recipe, built: Built, *, output_dir: str | Path, extra_callbacks: Sequence[Callback]
) -> L.Trainer:
    node = step_based_validation(dict(recipe.slot("trainer") or {"_target_": "lightning.Trainer"}))
    allow = recipe.allowed_prefixes
    recipe_callbacks = instantiate(node.pop("callbacks", None) or [], allow=allow, key="trainer.callbacks")
    run_folder = built.run_id or f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    built.checkpoint_dir = (Path(output_dir) / "checkpoints" / run_folder).resolve()
    best = _checkpoint_callback(recipe, built, built.checkpoint_dir)
    quiet_third_party()  # before Trainer(): it prints a tip about a cloud logger
    built.callbacks = [
        *recipe_callbacks,
        best,
        # without a progress bar, a line per validation: the step and the primary metric
        *([] if progress_bar_wanted() else [ValidationLine(best.monitor)]),
        *_periodic_checkpoints(recipe, built.checkpoint_dir),
        RecipeInCheckpoint(recipe),
        RandomStateInCheckpoint(),
        FiniteCheckpoints(),
        RunLogging(recipe, checkpoint_dir=built.checkpoint_dir),
        ParameterCount(),
        *extra_callbacks,
    ]
    inject: dict[str, Any] = {
        "callbacks": built.callbacks,
        "logger": built.logger if built.logger is not None else False,
        "default_root_dir": str(Path(output_dir).resolve()),
        "enable_progress_bar": progress_bar_wanted(),
        # checkpoints are written to a temporary file and renamed: no half-written file on a crash
        "plugins": [AtomicCheckpointIO()],
    }
    trainer = instantiate(node, inject=inject, allow=allow, key="trainer")
    if not isinstance(trainer, L.Trainer):
        raise RecipeError(
            f"recipe key trainer._target_ (set in {recipe.source('trainer._target_')}): "
            f"{node['_target_']} is not a lightning.Trainer"
        )
    return trainer
