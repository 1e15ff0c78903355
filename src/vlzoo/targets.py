"""What a recipe may construct: a reviewed list of callables, checked by identity.

A recipe is data. Its ``_target_`` nodes may only build callables that the project has looked at
and found free of code execution: no unpickling, no importing code from a folder, no evaluating
strings. The check is on the *object* a dotted path resolves to, not on the path itself, so
``torch.optim.adamw.AdamW`` is the same reviewed class as ``torch.optim.AdamW``, and
``vlzoo.config.os.system`` is still ``os.system`` and still refused.

The reviewed set (listed in ``docs/recipes.md``):

* vlzoo's public components: every public callable of :data:`COMPONENT_MODULES`, except the
  functions in :data:`NOT_FOR_RECIPES` (they write files);
* the third-party classes and factories recipes need, by name in :data:`THIRD_PARTY`, and the
  run parts of :data:`RUN_PARTS`;
* four families of constructors that only store values: ``torch.optim`` optimizers and
  learning-rate schedulers, ``torch.nn`` layers, ``transformers`` *configuration* classes and
  ``peft`` configurations (:func:`_in_reviewed_family`).

Anything else needs the caller's explicit trust: ``--allow-target PREFIX`` on the command line,
``allow_targets=[...]`` in Python (see :mod:`vlzoo.config`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

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
    }
)

#: vlzoo run parts a resolved recipe names: the MLflow logger that survives a lost server
#: (``vlzoo.tracking.make_logger`` puts it in place of Lightning's; its former path
#: ``vlzoo.runs.ResilientMLFlowLogger`` resolves to the same class).
RUN_PARTS: tuple[str, ...] = ("vlzoo.tracking.ResilientMLFlowLogger",)

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
