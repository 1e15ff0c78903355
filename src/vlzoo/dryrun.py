"""``vlzoo check --dry-run``: a recipe built at full size on the meta device, one training step
and one prediction step, before anyone books a GPU.

1. The recipe is validated, then built by :func:`vlzoo.build` inside
   :func:`~vlzoo.backbones.shipped.dry_loading`: every ``from_pretrained`` becomes the shipped
   architecture config (``vlzoo/backbones/model_configs``) on the ``meta`` device, the tokenizer
   a :func:`~vlzoo.data.tokenizer.sized_tokenizer` with the family's vocabulary size and special
   token ids, and weight files (SAM checkpoints, backbone checkpoints) are not read.
2. A batch of the recipe's ``data.batch_size`` is collated by the recipe's own datamodule
   (template, resize, ``max_length``, the built tokenizer and the paradigm's answer format) at the
   backbone's input size.  Datasets whose files are not here (RefCOCO, COCO) are replaced by the
   synthetic Shapes data with the same tasks.  Token ids, masks, boxes and targets stay real CPU
   tensors; the images go to the meta device.
3. ``paradigm.loss`` + backward, one optimizer step, and ``paradigm.predict`` on a batch of
   ``data.eval_batch_size`` run under :class:`~vlzoo.meta_exec.MetaExecution`.  A failure is
   reported with the recipe key of the innermost module that was running (and what the recipe
   sets under it).  Values a step reads from meta tensors are taken as zero and listed
   (predict reads its generated tokens, so its decoded outputs are not meaningful).
4. Checks: LoRA ``target_modules`` that matched no module; special tokens of the paradigm that
   the tokenizer does not keep as one token; trainable / total parameters per part; the memory
   plan (:mod:`vlzoo.memory`) from the same built model, optimizer and step.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlzoo.backbones.shipped import dry_loading
from vlzoo.build import _data_injection, as_recipe, build
from vlzoo.config import Recipe, RecipeError, flatten, instantiate, validate
from vlzoo.memory import (
    ActivationCount,
    MemoryPlan,
    SavedTensorCounter,
    checkpointable_layers,
    memory_plan,
    strategy_of,
)
from vlzoo.meta_exec import MetaExecution, MetaRead

__all__ = ["DryRunIssue", "DryRunReport", "dry_run", "parameter_parts"]

_KEY = re.compile(r"recipe key (\S+?):")
_NO_FILES = ("DataError", "FileNotFoundError")


@dataclass(frozen=True)
class DryRunIssue:
    """One problem the dry run found, with the recipe key that caused it."""

    key: str
    source: str
    message: str

    def __str__(self) -> str:
        return f"recipe key {self.key} (set in {self.source}): {self.message}"


@dataclass
class DryRunReport:
    """What :func:`dry_run` found (``ok`` when ``issues`` is empty)."""

    recipe: str
    issues: list[DryRunIssue] = field(default_factory=list)
    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    parts: list[tuple[str, int, int]] = field(default_factory=list)
    special_tokens: list[tuple[str, int, bool]] = field(default_factory=list)
    lora: dict[str, int] = field(default_factory=dict)
    losses: list[str] = field(default_factory=list)
    train_reads: list[MetaRead] = field(default_factory=list)
    predict_reads: list[MetaRead] = field(default_factory=list)
    predictions: int = 0
    memory: MemoryPlan | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.issues

    def format(self) -> str:
        lines = [f"dry run of {self.recipe}: {'ok' if self.ok else f'{len(self.issues)} problem(s)'} ({self.seconds:.1f} s)"]
        for issue in self.issues:
            lines.append(f"  ERROR {issue}")
        if self.replaced:
            lines.append("loading replaced:")
            lines += [f"  {what} {name} -> {how}" for what, name, how in self.replaced]
        if self.data:
            lines.append("batches:")
            lines += [f"  {text}" for text in self.data]
        if self.parts:
            lines.append("parameters (trainable / total):")
            width = max(len(p) for p, _, _ in self.parts)
            for part, trainable, total in self.parts:
                lines.append(f"  {part:<{width}}  {trainable:>15,} / {total:>15,}")
        if self.special_tokens:
            tokens = ", ".join(f"{t} {i}{' (added)' if added else ''}" for t, i, added in self.special_tokens)
            lines.append(f"special tokens: {tokens}")
        if self.lora:
            lines.append("LoRA target modules (matched layers): " + ", ".join(f"{k} {v}" for k, v in self.lora.items()))
        if self.losses:
            lines.append("training step: loss parts " + ", ".join(self.losses) + "; backward and optimizer step ran")
        for label, reads in (("training step", self.train_reads), ("prediction step", self.predict_reads)):
            if reads:
                places = sorted({r.where for r in reads})
                lines.append(f"{label}: {len(reads)} value(s) read from meta tensors (true / 0), at " + "; ".join(places[:6])
                             + (f" and {len(places) - 6} more" if len(places) > 6 else ""))
        if self.predictions:
            lines.append(f"prediction step: {self.predictions} predictions (shapes checked; values not meaningful)")
        if self.memory is not None:
            lines.append(self.memory.format())
        return "\n".join(lines)


# --------------------------------------------------------------------------- recipe keys
def _module_keys(recipe: Recipe, built: Any) -> dict[int, str]:
    """``id(module) -> recipe key`` of every recipe node that built an ``nn.Module``."""
    roots = {"backbone": built.backbone, "paradigm": built.model}
    out: dict[int, str] = {}
    for key in sorted(k[: -len("._target_")] for k in flatten(recipe.data) if k.endswith("._target_")):
        slot, *rest = key.split(".")
        obj = roots.get(slot)
        for part in rest:
            obj = getattr(obj, part, None) if not part.isdigit() else None
        if isinstance(obj, nn.Module):
            out.setdefault(id(obj), key)
    return out


_DOTTED = re.compile(r"\b((?:backbone|paradigm|data|evaluator|optimizer|scheduler|trainer)(?:\.[A-Za-z_]\w*)+)")


def _narrowest(recipe: Recipe, key: str, message: str) -> str:
    """The most specific recipe key under ``key`` that ``message`` names (``paradigm.attention_layers``)."""
    named = [k for k in _DOTTED.findall(message) if recipe.get(k) is not None and (k + ".").startswith(key + ".")]
    return max(named, key=len) if named else key


def _settings(recipe: Recipe, key: str) -> str:
    node = recipe.get(key)
    if not isinstance(node, Mapping):
        return ""
    scalars = [f"{k}={v}" for k, v in node.items() if not k.startswith("_") and not isinstance(v, (Mapping, list))]
    return f"; the recipe sets {', '.join(scalars)}" if scalars else ""


class _ModuleStack:
    """The modules running right now (forward pre / post hooks on every module)."""

    def __init__(self) -> None:
        self.stack: list[nn.Module] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _ModuleStack:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [
            register_module_forward_pre_hook(lambda m, _a: self.stack.append(m)),
            register_module_forward_hook(lambda m, _a, _o: self._pop(m)),
        ]
        return self

    def _pop(self, module: nn.Module) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def _failure(recipe: Recipe, built: Any, stack: Sequence[nn.Module], err: BaseException, step: str) -> DryRunIssue:
    keys = _module_keys(recipe, built)
    names = {id(m): n for n, m in built.model.named_modules()} if built.model is not None else {}
    key = "paradigm"
    for module in reversed(stack):
        if id(module) in keys:
            key = keys[id(module)]
            break
    inner = next((m for m in reversed(stack) if id(m) in names), None)
    where = ""
    if inner is not None:
        where = f" in module {names[id(inner)] or '<paradigm>'} ({type(inner).__name__})"
    key = _narrowest(recipe, key, str(err))
    message = f"{step} failed{where}: {type(err).__name__}: {err}{_settings(recipe, key)}"
    return DryRunIssue(key=key, source=recipe.source(key), message=message)


# --------------------------------------------------------------------------- data
def _shapes_stand_in(node: Mapping[str, Any], *, size: int, image_size: int, tasks: Sequence[str]) -> dict[str, Any]:
    return {
        "_target_": "vlzoo.data.ShapesDataset",
        "split": "train",
        "size": size,
        "image_size": image_size,
        "tasks": list(node.get("tasks") or tasks),
    }


def _dataset(node: Any, key: str, recipe: Recipe, *, size: int, image_size: int, tasks: Sequence[str],
             notes: list[str]) -> Any:
    """The dataset of ``node``; Shapes with the same tasks when its files are not here."""
    try:
        return instantiate(node, allow=recipe.allowed_prefixes, key=key)
    except RecipeError as err:
        if not any(name in str(err) for name in _NO_FILES):
            raise
        stand_in = _shapes_stand_in(node, size=size, image_size=image_size, tasks=tasks)
        notes.append(f"{key}: {node.get('_target_')} files not found; synthetic Shapes stand-in with tasks {stand_in['tasks']}")
        return instantiate(stand_in, allow=recipe.allowed_prefixes, key=key)


def _batches(recipe: Recipe, built: Any, notes: list[str]) -> tuple[Any, Any]:
    """``(train batch, eval batch)`` at the recipe's batch sizes (see the module doc)."""
    node = dict(recipe.slot("data"))
    inject = _data_injection(recipe, built, None)
    tasks = list(getattr(built.model, "tasks", None) or ["rec"])
    try:
        image_size = int(getattr(built.backbone, "input_size", None) or 224)
    except ValueError:  # a frame of its own per image (Qwen's smart_resize): no fixed side
        image_size = 224
    batch_size = int(node.get("batch_size", 16))
    eval_size = int(node.get("eval_batch_size") or batch_size)
    train_node = node.pop("train", None)
    evals = node.pop("val", None) or node.pop("test", None) or train_node
    for name in ("val", "test", "predict"):
        node.pop(name, None)
    if train_node is None:
        raise RecipeError("vlzoo check --dry-run needs a data.train dataset to make a training batch")
    if isinstance(evals, Mapping) and "_target_" not in evals:
        name, evals = next(iter(evals.items()))
        eval_key = f"data.val.{name}"
    else:
        eval_key = "data.val"
    datamodule = instantiate(node, inject=inject, allow=recipe.allowed_prefixes, key="data")
    train = _dataset(train_node, "data.train", recipe, size=batch_size, image_size=image_size, tasks=tasks, notes=notes)
    val = _dataset(evals, eval_key, recipe, size=eval_size, image_size=image_size, tasks=tasks, notes=notes)
    collate = datamodule.collate()
    batches = []
    for dataset, size, label in ((train, batch_size, "train"), (val, eval_size, "eval")):
        count = min(size, len(dataset))
        batch = collate([dataset[i] for i in range(count)])
        batch = dataclasses.replace(batch, images=batch.images.to("meta"))
        notes.append(
            f"{label}: {count} samples, images {tuple(batch.images.shape)}, tokens {tuple(batch.input_ids.shape)}, "
            f"tasks {sorted(set(batch.tasks))}"
        )
        batches.append(batch)
    return batches[0], batches[1]


# --------------------------------------------------------------------------- checks
def parameter_parts(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(part, trainable, total)``: the backbone's vision tower, projector and language model
    (LoRA and new-token rows included), then each other top-level module of the paradigm."""
    from vlzoo.backbones.policies import parameter_report

    backbone = getattr(model, "backbone", None)
    parts: list[tuple[str, nn.Module]] = []
    if backbone is not None:
        lm = backbone._lm() if hasattr(backbone, "_lm") else None
        inner = getattr(lm, "model", None)
        if hasattr(inner, "vision_tower") and hasattr(inner, "multi_modal_projector"):
            vision, projector = inner.vision_tower, inner.multi_modal_projector
        else:
            vision, projector = getattr(backbone, "vision", None), getattr(backbone, "projector", None)
        inside = {id(p) for part in (vision, projector) if part is not None for p in part.parameters()}
        for name, part in (("backbone.vision", vision), ("backbone.projector", projector)):
            if part is not None:
                parts.append((name, part))
        rest = [p for p in backbone.parameters() if id(p) not in inside]
        holder = nn.Module()
        holder.params = nn.ParameterList(rest)
        parts.append(("backbone.language", holder))
    for name, child in model.named_children():
        if child is backbone or not any(True for _ in child.parameters()):
            continue
        parts.append((f"paradigm.{name}", child))
    out = [(name, *parameter_report(part).values()) for name, part in parts]
    total = parameter_report(model)
    out.append(("total", total["trainable"], total["total"]))
    return [(name, int(a), int(b)) for name, a, b in out]


def _lora_matches(recipe: Recipe, backbone: Any, report: DryRunReport) -> None:
    from vlzoo.backbones.policies import LORA_DEFAULTS

    settings = recipe.get("backbone.lora")
    peft = getattr(backbone, "peft_model", None)
    if not isinstance(settings, Mapping) or peft is None:
        return
    targets = settings.get("target_modules") or LORA_DEFAULTS["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    lora_layers = [name for name, module in peft.named_modules() if hasattr(module, "lora_A")]
    for target in targets:
        matched = sum(1 for name in lora_layers if name == target or name.endswith(f".{target}"))
        report.lora[target] = matched
        if matched == 0:
            key = "backbone.lora.target_modules"
            decoder = backbone._lm().get_decoder()
            leaves = sorted({
                n.replace(".base_layer", "").rsplit(".", 1)[-1]
                for n, m in decoder.named_modules()
                if isinstance(m, nn.Linear) and ".lora_" not in n
            })
            report.issues.append(DryRunIssue(
                key=key, source=recipe.source(key),
                message=f"LoRA target {target!r} matched no module of the language model; its linear layers are "
                        f"named {', '.join(leaves)}",
            ))


def _special_token_checks(recipe: Recipe, built: Any, report: DryRunReport) -> None:
    backbone, model = built.backbone, built.model
    tokenizer = getattr(backbone, "tokenizer", None)
    tokens = list(getattr(getattr(model, "answer_format", None), "special_tokens", None) or [])
    if tokenizer is None or not tokens:
        return
    vocab = tokenizer.get_vocab()
    added = set(getattr(backbone, "added_tokens", []) or [])
    rows = backbone._vocab_rows() if hasattr(backbone, "_vocab_rows") else None
    flat = flatten(recipe.data)
    for token in tokens:
        key = next((k for k, v in flat.items() if k.startswith("paradigm") and v == token), "paradigm.answer_format")
        token_id = vocab.get(token)
        if token_id is None:
            report.issues.append(DryRunIssue(key, recipe.source(key), f"special token {token!r} is not in the tokenizer"))
            continue
        report.special_tokens.append((token, int(token_id), token in added))
        ids = tokenizer(f"a {token} b", add_special_tokens=False)["input_ids"]
        if token_id not in ids:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            report.issues.append(DryRunIssue(
                key, recipe.source(key),
                f"special token {token!r} (id {token_id}) is an ordinary word of the tokenizer: in a sentence it "
                f"tokenizes as {pieces}, so the paradigm never sees its id; choose a token the vocabulary lacks "
                "(it is then added as a special token)",
            ))
        elif rows is not None and token_id >= rows:
            report.issues.append(DryRunIssue(
                key, recipe.source(key), f"special token {token!r} has id {token_id} but the embedding has {rows} rows"))


# --------------------------------------------------------------------------- the run
def _checkpointing_flags(model: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    flags = []
    for module in model.modules():
        for name in ("gradient_checkpointing", "grad_checkpointing"):
            value = getattr(module, name, None)
            if isinstance(value, bool):
                flags.append((module, name, value))
    return flags


def dry_run(
    recipe: Recipe | str | Path | Mapping[str, Any],
    *,
    overrides: Sequence[str] = (),
    allow_targets: Sequence[str] = (),
    predict: bool = True,
) -> DryRunReport:
    """Build ``recipe`` at full size on the meta device and run one training and one prediction
    step (see the module doc).  Problems are collected in the report, not raised, except a
    recipe that does not validate (:class:`~vlzoo.config.RecipeError`)."""
    start = time.perf_counter()
    recipe = as_recipe(recipe, overrides=overrides, allow_targets=allow_targets)
    validate(recipe)
    report = DryRunReport(recipe=str(recipe.path or recipe.name))

    def done() -> DryRunReport:
        report.seconds = time.perf_counter() - start
        return report

    try:
        with dry_loading() as loading:
            built = build(recipe, with_data=False, with_trainer=False)
    except RecipeError as err:
        match = _KEY.search(str(err))
        key = _narrowest(recipe, match.group(1) if match else "paradigm", str(err))
        report.issues.append(DryRunIssue(key, recipe.source(key), f"building failed: {err}"))
        return done()
    report.replaced = loading.replaced
    model = built.model
    if model is None:
        raise RecipeError("vlzoo check --dry-run needs a 'paradigm' slot")
    if built.backbone is not None:
        _lora_matches(recipe, built.backbone, report)
        _special_token_checks(recipe, built, report)
    report.parts = parameter_parts(model)
    try:
        train_batch, eval_batch = _batches(recipe, built, report.data)
    except RecipeError as err:
        match = _KEY.search(str(err))
        key = match.group(1) if match else "data"
        report.issues.append(DryRunIssue(key, recipe.source(key), f"making a batch failed: {err}"))
        return done()

    # the training step, with checkpointing off so every layer's saved tensors are seen (the
    # with-checkpointing figure is derived from them, see vlzoo.memory)
    flags = _checkpointing_flags(model)
    recipe_checkpointing = any(value for _, _, value in flags)
    layers = checkpointable_layers(model)
    for module, name, _ in flags:
        setattr(module, name, False)
    strategy, world, precision = strategy_of(recipe)
    mode = MetaExecution(autocast=_autocast(precision))
    model.train()
    counter = SavedTensorCounter(model, layers)
    with _ModuleStack() as stack:
        try:
            with mode, counter:
                parts = model.loss(train_batch)
                total = model.weighted_total(parts)
            report.losses = sorted(parts)
            with mode:
                total.backward()
        except Exception as err:  # noqa: BLE001 - every failure becomes a report line with its recipe key
            report.issues.append(_failure(recipe, built, stack.stack, err, "training step"))
            return done()
        finally:
            for module, name, value in flags:
                setattr(module, name, value)
        report.train_reads = list(mode.reads)
        groups = [g for g in model.param_groups() if g["params"]]
        optimizer = (model.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3)))(groups)
        with mode:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if predict:
            predict_mode = MetaExecution(autocast=mode.autocast)
            model.eval()
            stack.stack.clear()
            try:
                with predict_mode, torch.no_grad():
                    report.predictions = len(model.predict(eval_batch))
            except Exception as err:  # noqa: BLE001
                report.issues.append(_failure(recipe, built, stack.stack, err, "prediction step"))
            report.predict_reads = list(predict_mode.reads)
    activations: ActivationCount = counter.count
    fsdp_min = _fsdp_min_params(recipe)
    report.memory = memory_plan(
        model, optimizer, activations, strategy=strategy, world=world, precision=precision,
        batch_size=len(train_batch), gradient_checkpointing=recipe_checkpointing, fsdp_min_num_params=fsdp_min,
    )
    return done()


def _autocast(precision: str) -> torch.dtype | None:
    """The autocast dtype of Lightning's mixed precision (``None`` for ``32-true`` and the
    ``-true`` half precisions, which cast the weights instead)."""
    if precision in ("bf16-mixed", "bf16"):
        return torch.bfloat16
    if precision in ("16-mixed", "16"):
        return torch.float16
    return None


def _fsdp_min_params(recipe: Recipe) -> int:
    value = recipe.get("trainer.strategy.auto_wrap_policy.min_num_params")
    return int(value) if value is not None else 100_000_000
