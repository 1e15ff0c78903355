"""Checking a recipe before anything heavy is built.

This module owns :func:`validate`: every ``_target_`` allowed (:func:`~vlzoo.config.targets.locate`)
and importable, every argument a parameter of its target (with the nearest valid name for a
typo), every value of a plainly annotated parameter (``int``, ``float``, ``bool``, ``str``,
``Literal``) of the right kind, every required parameter set or injected by
:func:`vlzoo.build.build`, the counts of the ``data`` slot in range, argument names that switch
on code loading refused, and a stored recipe's ``allow_targets`` confirmed by the caller
(:func:`check_trust`). Each error names the key path and the file or override that set it.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from vlzoo.config.recipe import (
    _PARTIAL,
    _SPECIAL,
    _TARGET,
    INJECTABLE,
    PLAIN_KEYS,
    SLOTS,
    Recipe,
    RecipeError,
    _dotted,
    _Path,
    _suggest,
)
from vlzoo.config.targets import BUILT_AS, DEFAULT_LOGGER_TARGET, REFUSED_ARGUMENTS, locate

__all__ = ["validate", "check_trust", "DATA_COUNTS"]


def _signature(obj: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _iter_nodes(node: Any, path: _Path) -> Iterator[tuple[_Path, Mapping[str, Any]]]:
    """Every mapping with a ``_target_`` under ``node``, outermost first."""
    if isinstance(node, Mapping):
        if _TARGET in node:
            yield path, node
        for key, value in node.items():
            if key not in _SPECIAL:
                yield from _iter_nodes(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _iter_nodes(value, path + (i,))


def check_trust(recipe: Recipe) -> None:
    """Refuse a recipe whose ``allow_targets`` name a prefix the caller has not confirmed (a
    stored recipe's, see :attr:`Recipe.confirmed`); part of :func:`validate`."""
    unconfirmed = recipe.unconfirmed_targets
    if unconfirmed:
        flags = " ".join(f"--allow-target {p}" for p in unconfirmed)
        raise RecipeError(
            f"recipe key allow_targets (set in {recipe.source('allow_targets')}) asks to trust "
            f"{', '.join(unconfirmed)}, whose code would run. A stored recipe (a checkpoint's, a run's, an export's) "
            f"cannot extend what it may construct by itself: if you trust it, confirm on the command line with "
            f"{flags} (Python: allow_targets={list(unconfirmed)!r})."
        )


def validate(recipe: Recipe, *, injectable: Mapping[str, Collection[str]] | None = None) -> None:
    """Check a recipe without building anything: every ``_target_`` allowed and importable,
    every argument a parameter of its target (with a nearest-name suggestion for typos), every
    required parameter set by the recipe or injectable by :func:`vlzoo.build.build`.

    Raises :class:`RecipeError` naming the key path and the file that set it.
    """
    injectable = INJECTABLE if injectable is None else injectable
    check_trust(recipe)
    prefixes = recipe.allowed_prefixes
    _check_arguments(recipe, recipe.data, ())
    for key in PLAIN_KEYS:
        for path, _ in _iter_nodes(recipe.data.get(key), (key,)):
            where = _dotted(path + (_TARGET,))
            raise RecipeError(
                f"recipe key {where} (set in {recipe.source(where)}): only the slots ({', '.join(SLOTS)}) are "
                f"built; a _target_ under '{key}' would never be, so it is refused rather than ignored"
            )
    for slot in SLOTS:
        node = recipe.data.get(slot)
        if node is None:
            continue
        if not isinstance(node, Mapping):
            raise RecipeError(
                f"recipe key {slot} (set in {recipe.source(slot)}) must be a mapping with a _target_, "
                f"got {type(node).__name__} {node!r}"
            )
        if _TARGET not in node and slot == "logger":
            node = {**node, _TARGET: DEFAULT_LOGGER_TARGET}  # the default logger's arguments
        if _TARGET not in node:
            raise RecipeError(f"recipe key {slot} (set in {recipe.source(slot)}) has no _target_")
        for path, sub in _iter_nodes(node, (slot,)):
            _validate_node(recipe, path, sub, prefixes, frozenset(injectable.get(slot, ())))
    _check_data_counts(recipe)
    _check_schedule_length(recipe)
    _check_instructions(recipe)
    seed = recipe.data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RecipeError(f"recipe key seed (set in {recipe.source('seed')}) must be an integer, got {seed!r}")


def _check_instructions(recipe: Recipe) -> None:
    """``data.instructions`` (a family's task wording) is data: its wordings are checked here,
    before anything is built (:func:`vlzoo.data.templates.instruction_table`)."""
    data = recipe.data.get("data")
    if not isinstance(data, Mapping) or data.get("instructions") is None:
        return
    from vlzoo.data.templates import instruction_table

    try:
        instruction_table(data.get("instructions"))
    except ValueError as err:
        raise RecipeError(f"{err} (set in {recipe.source('data.instructions')})") from None


def _check_schedule_length(recipe: Recipe) -> None:
    """A schedule over the run's length (a scheduler taking ``total_steps``, filled from the
    trainer) needs a run with an end: refuse ``trainer.max_steps=-1`` with ``trainer.max_epochs=-1``."""
    scheduler = recipe.data.get("scheduler")
    trainer = recipe.data.get("trainer")
    if not isinstance(scheduler, Mapping) or not isinstance(trainer, Mapping) or "total_steps" in scheduler:
        return
    if trainer.get("max_steps", -1) not in (-1, None) or trainer.get("max_epochs") != -1:
        return
    signature = _signature(locate(str(scheduler.get(_TARGET)), recipe.allowed_prefixes))
    if signature is None or "total_steps" not in signature.parameters:
        return
    raise RecipeError(
        f"recipe key scheduler ({scheduler.get(_TARGET)}, set in {recipe.source('scheduler')}) decays over the run's "
        f"length, but trainer.max_steps and trainer.max_epochs are both -1 (a run without an end; set in "
        f"{recipe.source('trainer.max_epochs')}). Set trainer.max_steps (or trainer.max_epochs), or give the "
        "scheduler its length (scheduler.total_steps=N)"
    )


def _check_arguments(recipe: Recipe, node: Any, path: _Path) -> None:
    """Refuse the argument names that switch on code loading, at any depth."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key in REFUSED_ARGUMENTS:
                where = _dotted(path + (key,))
                raise RecipeError(
                    f"recipe key {where} (set in {recipe.source(where)}): '{key}' may not be set by a recipe: "
                    "vlzoo never loads code with model files (no trust_remote_code, weights are loaded with "
                    "weights_only=True or from safetensors). Remove the key."
                )
            _check_arguments(recipe, value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_arguments(recipe, value, path + (i,))


#: counts in the data slot (at any depth) and the smallest value each may take
DATA_COUNTS: dict[str, tuple[int, str]] = {
    "size": (1, "the number of samples of the split; to run without it, leave the split out: {split}=null"),
    "batch_size": (1, "samples per training batch"),
    "eval_batch_size": (1, "samples per evaluation batch"),
    "num_workers": (0, "dataloader worker processes (0: load in the main process)"),
}


def _check_data_counts(recipe: Recipe) -> None:
    """Sizes, batch sizes and worker counts of the ``data`` slot are checked before anything is
    built: a negative or zero size would otherwise surface as a traceback from the dataloader, or
    as a split that seems to be missing."""
    node = recipe.data.get("data")
    if not isinstance(node, Mapping):
        return
    for path, sub in _iter_nodes(node, ("data",)):
        for name, (least, meaning) in DATA_COUNTS.items():
            value = sub.get(name)
            if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= least):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                continue  # a wrong type is reported by the signature check, with the type expected
            key = f"{_dotted(path)}.{name}"
            split = _dotted(path) if len(path) > 1 else "data.<split>"
            raise RecipeError(
                f"recipe key {key} (set in {recipe.source(key)}) must be at least {least}, got {value}: "
                f"{meaning.format(split=split)}. Override it: {key}=<integer >= {least}>"
            )


def _validate_node(
    recipe: Recipe, path: _Path, node: Mapping[str, Any], prefixes: Collection[str], injectable: Collection[str]
) -> None:
    key = _dotted(path)
    target_key = f"{key}._target_"
    built_as = BUILT_AS.get(str(node[_TARGET])) if path == ("logger",) else None
    try:
        obj = locate(built_as or node[_TARGET], prefixes)
    except RecipeError as err:
        raise RecipeError(f"recipe key {target_key} (set in {recipe.source(target_key)}): {err}") from None
    partial = node.get(_PARTIAL, False)
    if not isinstance(partial, bool):
        raise RecipeError(f"recipe key {key}._partial_ (set in {recipe.source(key + '._partial_')}) must be true or false")
    sig = _signature(obj)
    if sig is None:
        return
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        name: p
        for name, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    args = [k for k in node if k not in _SPECIAL]
    for arg in args:
        if not isinstance(arg, str):
            raise RecipeError(f"recipe key {key}.{arg} (set in {recipe.source(f'{key}.{arg}')}): argument names must be strings")
        if arg not in named and not takes_any:
            arg_key = f"{key}.{arg}"
            raise RecipeError(
                f"recipe key {arg_key} (set in {recipe.source(arg_key)}): {node[_TARGET]}"
                f"{f' (built as {built_as})' if built_as else ''} has no parameter "
                f"'{arg}'.{_suggest(arg, named)} Its parameters are: {', '.join(named) or '(none)'}."
            )
    hints = _scalar_hints(obj)
    for arg in args:
        allowed = hints.get(arg)
        if allowed is not None and not _fits(node[arg], allowed):
            arg_key = f"{key}.{arg}"
            value = node[arg]
            raise RecipeError(
                f"recipe key {arg_key} (set in {recipe.source(arg_key)}): {node[_TARGET]} expects "
                f"{_describe(allowed)} for '{arg}', got {type(value).__name__} {value!r}. Fix it where it was set, "
                f"or override it: {arg_key}={_example(allowed)}"
            )
    if partial:
        return
    missing = [
        name
        for name, p in named.items()
        if p.default is inspect.Parameter.empty and name not in node and name not in injectable and name != "self"
    ]
    if missing:
        raise RecipeError(
            f"recipe key {key} (set in {recipe.source(target_key)}): {node[_TARGET]} needs "
            f"{', '.join(missing)}, which the recipe does not set and vlzoo.build does not inject"
        )


_SCALARS: tuple[type, ...] = (bool, int, float, str)


@functools.lru_cache(maxsize=512)
def _scalar_hints(obj: Callable[..., Any]) -> dict[str, tuple[Any, ...]]:
    """Parameter name -> what a recipe value may be, for parameters annotated with plain scalar
    types (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, unions of them, optional or
    not).  Parameters with any other annotation are not listed: they are not checked."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check nothing
        return {}
    out: dict[str, tuple[Any, ...]] = {}
    for name, hint in hints.items():
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        allowed: list[Any] = []
        for member in members:
            if member is type(None):
                continue
            if member in _SCALARS:
                allowed.append(member)
            elif getattr(member, "__module__", None) == "torch" and getattr(member, "__name__", None) == "Tensor":
                continue  # `lr: float | Tensor`: YAML never gives a tensor (a _target_ node may build one)
            elif typing.get_origin(member) is typing.Literal:
                allowed.append(("literal", typing.get_args(member)))
            else:
                break
        else:
            if allowed:
                out[name] = tuple(allowed)
    return out


def _fits(value: Any, allowed: tuple[Any, ...]) -> bool:
    if value is None or (isinstance(value, Mapping) and _TARGET in value):
        return True  # None: many APIs accept it unannotated; a node is built into whatever it makes
    for kind in allowed:
        if isinstance(kind, tuple):
            if any(value == v and type(value) is type(v) for v in kind[1]):
                return True
        elif kind is bool:
            if isinstance(value, bool):
                return True
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif isinstance(value, str):
            return True
    if isinstance(value, str) and any(kind in (int, float) for kind in allowed):
        try:  # numbers from ${oc.env:...} arrive as text and are converted by the component
            float(value)
            return True
        except ValueError:
            return False
    return False


def _describe(allowed: tuple[Any, ...]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    parts = [names[kind] for kind in allowed if not isinstance(kind, tuple)]
    literals = [repr(v) for kind in allowed if isinstance(kind, tuple) for v in kind[1]]
    if literals:
        parts.append("one of " + ", ".join(literals))
    return " or ".join(dict.fromkeys(parts))


def _example(allowed: tuple[Any, ...]) -> str:
    kind = allowed[0]
    if isinstance(kind, tuple):
        return str(kind[1][0])
    return {bool: "true|false", int: "<integer>", float: "<number>", str: "<text>"}[kind]
