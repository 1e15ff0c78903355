"""What a recipe may construct, and how a ``_target_`` becomes that callable.

A recipe is data. Its ``_target_`` nodes may only build callables that the project has looked at
and found free of code execution: no unpickling, no importing code from a folder, no evaluating
strings. The check is on the *object* a dotted path resolves to, not on the path itself, so
``torch.optim.adamw.AdamW`` is the same reviewed class as ``torch.optim.AdamW``, and
``vlzoo.config.targets.importlib.import_module`` is still ``importlib.import_module`` and still
refused.

The reviewed set (listed in ``docs/recipes.md``):

* vlzoo's public components: every public callable of :data:`COMPONENT_MODULES`, except the
  functions in :data:`NOT_FOR_RECIPES` (they write files, or are helpers with no place in a
  recipe);
* the third-party classes and factories recipes need, by name in :data:`THIRD_PARTY`, and the
  run parts of :data:`RUN_PARTS`;
* four families of constructors that only store values: ``torch.optim`` optimizers and
  learning-rate schedulers, ``torch.nn`` layers, ``transformers`` *configuration* classes and
  ``peft`` configurations (:func:`_in_reviewed_family`).

Anything else needs the caller's explicit trust: ``--allow-target PREFIX`` on the command line,
``allow_targets=[...]`` in Python; :func:`locate` applies both. This module also lists what else
a recipe may not do (:data:`ALLOWED_RESOLVERS`, :data:`REFUSED_ARGUMENTS`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import types
from collections.abc import Callable, Collection, Sequence
from typing import Any

from vlzoo.config.recipe import RecipeError, _suggest

__all__ = [
    "COMPONENT_MODULES",
    "NOT_FOR_RECIPES",
    "RUN_PARTS",
    "THIRD_PARTY",
    "REVIEWED_PACKAGES",
    "ALLOWED_RESOLVERS",
    "REFUSED_ARGUMENTS",
    "is_reviewed",
    "reviewed_names",
    "locate",
    "is_trusted",
]

#: vlzoo modules whose public names (``__all__``) are components a recipe may build.
COMPONENT_MODULES: tuple[str, ...] = (
    "vlzoo.data",
    "vlzoo.data.shapes",
    "vlzoo.backbones",
    "vlzoo.decoders",
    "vlzoo.paradigms",
    "vlzoo.paradigms.codecs",
    "vlzoo.evaluation",
)

#: Public vlzoo functions that are not components: they write files wherever they are told.
NOT_FOR_RECIPES: frozenset[str] = frozenset(
    {
        "vlzoo.data.export_shapes_coco",
        "vlzoo.data.save_shapes_tokenizer",
        # instruction wording: helpers the datamodule calls with a checked table, not components
        "vlzoo.data.instruction",
        "vlzoo.data.instruction_table",
        "vlzoo.data.reword",
        "vlzoo.data.worded",
    }
)

#: vlzoo run parts a resolved recipe names: the MLflow logger that survives a lost server
#: (``vlzoo.tracking.make_logger`` puts it in place of Lightning's).
RUN_PARTS: tuple[str, ...] = ("vlzoo.tracking.ResilientMLFlowLogger",)

#: The logger of a recipe whose ``logger`` slot is absent or names no ``_target_`` (then the slot
#: holds this logger's arguments: ``logger.flush_seconds=0`` on the command line is enough).
DEFAULT_LOGGER_TARGET = "lightning.pytorch.loggers.MLFlowLogger"

#: Recipe targets built as another class that takes the same arguments and more: a recipe's
#: MLflow logger is built as :class:`vlzoo.tracking.ResilientMLFlowLogger`, so ``vlzoo check``
#: checks the logger's arguments (``logger.flush_seconds`` among them) against that class.
BUILT_AS: dict[str, str] = {
    "lightning.pytorch.loggers.MLFlowLogger": RUN_PARTS[0],
    "lightning.pytorch.loggers.mlflow.MLFlowLogger": RUN_PARTS[0],
}

#: Third-party callables a recipe may build, by one of their public paths.
THIRD_PARTY: tuple[str, ...] = (
    # the trainer and its parts
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.EarlyStopping",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.ModelSummary",
    "lightning.pytorch.callbacks.RichModelSummary",
    "lightning.pytorch.callbacks.TQDMProgressBar",
    "lightning.pytorch.callbacks.RichProgressBar",
    "lightning.pytorch.callbacks.Timer",
    "lightning.pytorch.callbacks.GradientAccumulationScheduler",
    "lightning.pytorch.callbacks.StochasticWeightAveraging",
    "lightning.pytorch.callbacks.DeviceStatsMonitor",
    "lightning.pytorch.strategies.SingleDeviceStrategy",
    "lightning.pytorch.strategies.DDPStrategy",
    "lightning.pytorch.strategies.FSDPStrategy",
    "lightning.pytorch.strategies.DeepSpeedStrategy",
    "lightning.pytorch.plugins.precision.MixedPrecision",
    "lightning.pytorch.plugins.precision.HalfPrecision",
    "lightning.pytorch.plugins.precision.DoublePrecision",
    "lightning.pytorch.plugins.precision.FSDPPrecision",
    "lightning.pytorch.plugins.environments.LightningEnvironment",
    "lightning.pytorch.plugins.environments.SLURMEnvironment",
    "lightning.pytorch.plugins.environments.TorchElasticEnvironment",
    "lightning.pytorch.loggers.MLFlowLogger",
    "lightning.pytorch.loggers.CSVLogger",
    # FSDP wrapping policies (``_partial_: true``)
    "torch.distributed.fsdp.wrap.size_based_auto_wrap_policy",
)

#: Packages in which reviewed callables live. A target outside them (and outside the caller's
#: trusted prefixes) is refused before anything is imported: importing a module runs its code.
REVIEWED_PACKAGES: tuple[str, ...] = ("vlzoo", "torch", "lightning", "transformers", "peft")

#: OmegaConf resolvers a recipe may use (``${oc.env:VAR,default}``, ``${oc.select:key,default}``);
#: node interpolation (``${data.batch_size}``) is always allowed. vlzoo registers none of its own.
ALLOWED_RESOLVERS: frozenset[str] = frozenset({"oc.env", "oc.select"})

#: Argument names a recipe may never set, whatever the target: they switch on code loading.
REFUSED_ARGUMENTS: frozenset[str] = frozenset({"trust_remote_code", "weights_only", "allow_pickle"})


def _resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _reviewed_ids() -> dict[int, str]:
    """``id(object) -> the public name it was reviewed under`` for the listed callables."""
    out: dict[int, str] = {}
    for module_name in COMPONENT_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            path = f"{module_name}.{name}"
            obj = getattr(module, name)
            if path in NOT_FOR_RECIPES or not callable(obj):
                continue
            out.setdefault(id(obj), path)
    for path in (*RUN_PARTS, *THIRD_PARTY):
        out.setdefault(id(_resolve(path)), path)
    return out


def _defined_under(obj: Any, package: str) -> bool:
    module = getattr(obj, "__module__", None)
    return isinstance(module, str) and (module == package or module.startswith(package + "."))


def _in_reviewed_family(obj: Any) -> bool:
    """Classes of the families whose constructors only store values: optimizers and schedulers
    of ``torch.optim``, layers of ``torch.nn``, ``transformers`` configuration classes (not
    ``AutoConfig``, not any ``from_pretrained``) and ``peft`` configurations."""
    if not inspect.isclass(obj):
        return False
    import torch

    if _defined_under(obj, "torch.optim"):
        schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if issubclass(obj, torch.optim.Optimizer) or issubclass(obj, schedulers):
            return True
    if _defined_under(obj, "torch.nn.modules") and issubclass(obj, torch.nn.Module):
        return True
    if _defined_under(obj, "transformers"):
        from transformers import PretrainedConfig

        if issubclass(obj, PretrainedConfig):
            return True
    if _defined_under(obj, "peft"):
        from peft import PeftConfig

        if issubclass(obj, PeftConfig):
            return True
    return False


def is_reviewed(obj: Any) -> bool:
    """Whether ``obj`` (the object a ``_target_`` resolves to) is on the reviewed list."""
    if id(obj) in _reviewed_ids():
        return True
    return _in_reviewed_family(obj)


def reviewed_names() -> list[str]:
    """The public names of the listed callables (the families aside), sorted: for the docs and
    for the test that pins the list, so that a new public vlzoo name is reviewed on purpose."""
    return sorted(_reviewed_ids().values())


# --- from a dotted path to a callable -------------------------------------------------------
def _under(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def is_trusted(target: str, prefixes: Collection[str]) -> bool:
    """Whether a dotted name is under one of the caller's trusted prefixes."""
    return any(_under(target, prefix) for prefix in prefixes)


def _refusal(target: str, prefixes: Collection[str], why: str = "") -> str:
    trusted = f" Trusted on purpose here: {', '.join(prefixes)}." if prefixes else ""
    return (
        f"_target_ {target} is not allowed{why}: a recipe may only construct vlzoo's components and the "
        "reviewed third-party classes (optimizers and schedulers, torch.nn layers, Lightning's Trainer, callbacks, "
        "strategies, plugins and loggers, transformers and peft configuration classes; the list is in "
        f"docs/recipes.md, 'What a recipe may construct').{trusted} To trust your own package on purpose, pass "
        "--allow-target PREFIX on the command line (Python: allow_targets=['PREFIX']) and, so that the run "
        "records it, name it in the recipe's allow_targets list."
    )


def _import_longest(parts: Sequence[str], target: str) -> tuple[types.ModuleType, int]:
    """The longest importable module prefix of ``parts`` and how many parts it spans."""
    index = len(parts)
    error: Exception | None = None
    while index > 0:
        name = ".".join(parts[:index])
        try:
            return importlib.import_module(name), index
        except ModuleNotFoundError as err:
            error = err
            if err.name is None or not _under(name, err.name):
                break  # the module exists but one of its own imports is missing
            index -= 1
        except Exception as err:  # noqa: BLE001 - report any import failure as a recipe error
            error = err
            break
    detail = f": {type(error).__name__}: {error}" if error else ""
    raise RecipeError(f"_target_ {target} cannot be imported{detail}")


def locate(target: str, prefixes: Collection[str] = ()) -> Callable[..., Any]:
    """The callable a ``_target_`` names, if a recipe may construct it.

    The object the path resolves to must be on the reviewed list (:func:`is_reviewed`; checked
    by identity, so every path to a reviewed class works and no path to anything else does), or
    lie under one of ``prefixes``, the caller's trusted module prefixes (then every module the
    path goes through and the module the object is defined in must be trusted too, so that
    ``mylab.os.system`` does not reach ``os.system``). Nothing is imported unless the path is
    under a package that holds reviewed callables or under a trusted prefix, and no part of the
    path may be private (``_name``). Raises :class:`RecipeError` (message without key path;
    callers add it).
    """
    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", target):
        raise RecipeError(f"_target_ {target!r} is not a dotted import path like torch.optim.AdamW")
    parts = target.split(".")
    private = next((part for part in parts if part.startswith("_")), None)
    if private is not None:
        raise RecipeError(_refusal(target, prefixes, f" (its path goes through the private name {private})"))
    trusted = is_trusted(target, prefixes)
    if not trusted and not is_trusted(target, REVIEWED_PACKAGES):
        raise RecipeError(_refusal(target, prefixes))
    module, index = _import_longest(parts, target)
    obj: Any = module
    for depth, attr in enumerate(parts[index:], start=index):
        if trusted and isinstance(obj, types.ModuleType) and not is_trusted(obj.__name__, prefixes):
            raise RecipeError(_refusal(target, prefixes, f" (it goes through module {obj.__name__})"))
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            owner = ".".join(parts[:depth])
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise RecipeError(f"_target_ {target}: {owner} has no attribute {attr}.{_suggest(attr, names)}") from None
    if isinstance(obj, types.ModuleType):
        raise RecipeError(f"_target_ {target} is a module, not a class or function")
    if not callable(obj):
        raise RecipeError(f"_target_ {target} is not callable")
    if is_reviewed(obj):
        return obj
    defined_in = getattr(obj, "__module__", None)
    if not trusted:
        where = f" (it is {defined_in}.{getattr(obj, '__qualname__', '?')})" if isinstance(defined_in, str) else ""
        raise RecipeError(_refusal(target, prefixes, f": it is not on the reviewed list{where}"))
    if not isinstance(defined_in, str) or not is_trusted(defined_in, prefixes):
        raise RecipeError(_refusal(target, prefixes, f" (it is defined in {defined_in})"))
    return obj
