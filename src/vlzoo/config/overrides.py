"""Command-line overrides: ``slot=name`` swaps a whole slot, ``a.b.c=value`` sets one value.

This module owns the override grammar as vlzoo spells it (a key path like
``trainer.max_steps``; ``slot=name`` for ``recipes/<slot>/<name>.yaml``, ``slot=null`` to drop
the slot), the order (slot swaps first, then dotted values, each in the order given) and the
errors that say how to write an override. Reading ``key=value`` into a nested value is
:meth:`OmegaConf.from_dotlist <omegaconf.OmegaConf.from_dotlist>` (the value is YAML, read by
OmegaConf's loader); the result merges onto the recipe by the rules of :mod:`vlzoo.config.layers`,
each leaf remembering the override that set it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlzoo.config.layers import Layer, _drop_under, load_file, merge
from vlzoo.config.recipe import SLOTS, RecipeError, _dotted, _suggest

__all__ = ["apply_overrides"]

_KEY_PATH = re.compile(r"[A-Za-z_][\w\-]*(\.[\w\-]+)*")


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form key=value (slot=name or a.b.c=value)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or not _KEY_PATH.fullmatch(key):
        raise RecipeError(f"override '{text}': '{key}' is not a key path like trainer.max_epochs")
    return key, value


def _slot_file(slot: str, name: str, roots: Sequence[Path]) -> Path:
    direct = Path(name)
    if name.endswith((".yaml", ".yml")) and direct.is_file():
        return direct
    tried = []
    for root in roots:
        candidate = root / slot / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if candidate.is_file():
            return candidate
        tried.append(candidate)
    options = sorted({p.stem for root in roots for p in (root / slot).glob("*.yaml")})
    hint = _suggest(name, options)
    listing = f" Available: {', '.join(options)}." if options else ""
    raise RecipeError(
        f"override {slot}={name}: no recipe {slot}/{name}.yaml in {', '.join(str(r) for r in roots) or 'any recipes folder'}."
        f"{hint}{listing}"
    )


def _read_override(key: str, raw: str, text: str) -> dict[str, Any]:
    """``a.b.c=value`` as the nested mapping ``{a: {b: {c: value}}}``. The value is YAML; when it
    is not valid YAML, the message names the override and shows how to pass the value as text
    (quoted for YAML, inside quotes for the shell)."""
    try:
        over = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={raw}"]), resolve=False)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        at = f" at character {mark.column + 1}" if mark is not None and mark.line == 0 else ""
        quoted = '"' + raw.replace("\\", "\\\\").replace('"', '\\"') + '"'
        raise RecipeError(
            f"override {text}: the value is not valid YAML ({problem}{at}). The value of an override is read as "
            "YAML, where { } [ ] , : # and quotes have a meaning; to pass it as text, quote it for YAML and the "
            f"whole override for the shell: '{key}={quoted}'"
        ) from None
    except OmegaConfBaseException as err:
        message = str(err).splitlines()[0]
        raise RecipeError(f"recipe key {key} (set in override {text}): cannot resolve interpolation: {message}") from None
    assert isinstance(over, dict)
    if not raw.strip():  # `key=` sets the empty text (YAML would read it as null)
        node = over
        for part in key.split(".")[:-1]:
            node = node[part]
        node[key.split(".")[-1]] = ""
    return over


def apply_overrides(
    layer_data: dict[str, Any],
    sources: dict[str, str],
    overrides: Sequence[str],
    *,
    roots: Sequence[Path],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply command-line overrides to an (unresolved) recipe tree: slot swaps first, then
    dotted values, each in the order given.  Returns the new tree and sources."""
    layer = Layer(copy.deepcopy(layer_data), {tuple(k.split(".")) if k else (): v for k, v in sources.items()})
    swaps: list[tuple[str, str, str]] = []
    values: list[tuple[str, str, str]] = []
    for text in overrides:
        key, value = _split_override(text)
        if key in SLOTS and value.strip() not in ("", "{}") and not value.strip().startswith("{"):
            swaps.append((key, value.strip(), text))
        else:
            values.append((key, value, text))
    for slot, name, text in swaps:
        if name in ("null", "~", "None"):
            layer.data.pop(slot, None)
            _drop_under(layer.prov, (slot,))
            continue
        node = load_file(_slot_file(slot, name, roots))
        _drop_under(layer.prov, (slot,))
        layer.data[slot] = node.data
        layer.prov.update({(slot,) + p: f"slot swap {text} ({s})" for p, s in node.prov.items()})
    for key, raw, text in values:
        path = tuple(key.split("."))
        node: Any = layer.data
        for depth, part in enumerate(path[:-1]):
            if not isinstance(node, dict):
                raise RecipeError(f"override {text}: {_dotted(path[:depth])} is not a mapping")
            node = node.get(part)
            if node is None:
                break  # missing or null: the override creates the mapping
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"override {text}: {_dotted(path[:-1])} is not a mapping")
        layer = merge(layer, Layer.of(_read_override(key, raw, text), f"override {text}"))
    return layer.data, {_dotted(p): s for p, s in layer.prov.items()}
