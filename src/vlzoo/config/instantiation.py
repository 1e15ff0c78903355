"""Building a recipe node: :func:`instantiate`, vlzoo's own small ``instantiate``.

This module owns turning a resolved node into objects: a mapping with ``_target_`` calls its
target (found by :func:`~vlzoo.config.targets.locate`, so only what a recipe may construct) with
its other keys built first, ``_partial_: true`` gives a :func:`functools.partial`, and built parts
are passed in by parameter name (``inject``). A constructor that refuses its arguments becomes a
:class:`~vlzoo.config.RecipeError` naming the key. No global state, no ``@hydra.main``.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Collection, Mapping
from typing import Any

from vlzoo.config.recipe import _PARTIAL, _SPECIAL, _TARGET, RecipeError
from vlzoo.config.targets import REFUSED_ARGUMENTS, locate
from vlzoo.config.validation import _signature

__all__ = ["instantiate"]


def instantiate(
    node: Any,
    *,
    inject: Mapping[str, Any] | None = None,
    allow: Collection[str] = (),
    key: str = "",
) -> Any:
    """Build a recipe node.

    A mapping with ``_target_`` calls the target with its other keys as keyword arguments
    (each built first); ``_partial_: true`` returns a :func:`functools.partial` instead.  Lists
    and plain mappings are built element by element; scalars are returned as they are.

    ``inject`` maps parameter names to built objects: a target whose signature has such a
    parameter, and whose node does not set it, receives it (at every depth).
    Targets are checked by :func:`locate`: reviewed callables, or under ``allow`` (the
    caller's trusted module prefixes).
    """
    inject = inject or {}
    if isinstance(node, list):
        return [instantiate(v, inject=inject, allow=allow, key=f"{key}.{i}" if key else str(i)) for i, v in enumerate(node)]
    if not isinstance(node, Mapping):
        return node
    if _TARGET not in node:
        return {k: instantiate(v, inject=inject, allow=allow, key=f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    try:
        target = locate(node[_TARGET], allow)
    except RecipeError as err:
        raise RecipeError(f"recipe key {key}._target_: {err}") from None
    refused = sorted(k for k in node if k in REFUSED_ARGUMENTS)
    if refused:
        raise RecipeError(f"recipe key {key}.{refused[0]}: '{refused[0]}' may not be set by a recipe")
    kwargs = {
        k: instantiate(v, inject=inject, allow=allow, key=f"{key}.{k}" if key else str(k))
        for k, v in node.items()
        if k not in _SPECIAL
    }
    sig = _signature(target)
    if sig is not None:
        for name, value in inject.items():
            param = sig.parameters.get(name)
            if (
                name not in kwargs
                and param is not None
                and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            ):
                kwargs[name] = value
    if node.get(_PARTIAL, False):
        return functools.partial(target, **kwargs)
    try:
        return target(**kwargs)
    except (ValueError, TypeError, OSError) as err:
        # a constructor refusing its arguments (a wrong value, a missing file) is a recipe
        # mistake; the original traceback stays attached as __cause__ (shown with --debug).
        # When the message names exactly one of the node's scalar arguments, so does the key
        # (not for vlzoo.data's DataError, which names a file and record and what to set).
        data_error = any(c.__name__ == "DataError" for c in type(err).__mro__)
        named = [
            k for k in node
            if not data_error and k not in _SPECIAL and isinstance(k, str) and not isinstance(node[k], (Mapping, list))
            and re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", str(err))
        ]
        where = f"{key}.{named[0]}" if key and len(named) == 1 else key or "<root>"
        raise RecipeError(f"recipe key {where}: building {node[_TARGET]} failed: {type(err).__name__}: {err}") from err
