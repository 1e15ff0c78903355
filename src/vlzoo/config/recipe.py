"""The resolved recipe and the words every part of :mod:`vlzoo.config` shares.

This module owns the :class:`Recipe` data class (the merged, resolved tree and the file or
override each key came from), :class:`RecipeError`, the slot names, what
:func:`vlzoo.build.build` injects into each slot, and the small helpers the other modules use to
word their errors (a dotted key path, a nearest-name suggestion).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RecipeError", "Recipe", "SLOTS", "PLAIN_KEYS", "TOP_LEVEL_KEYS", "INJECTABLE", "flatten"]

#: Slots of a recipe, in the order :func:`vlzoo.build.build` instantiates them.
SLOTS: tuple[str, ...] = (
    "backbone",
    "evaluator",
    "optimizer",
    "scheduler",
    "paradigm",
    "data",
    "trainer",
    "logger",
)
#: Plain (non-slot) top-level keys: ``seed`` (int), ``name`` (run name), ``allow_targets``
#: (extra allowed module prefixes), ``tags`` (extra MLflow tags), ``checkpoint`` (``monitor``,
#: ``mode``, ``save_top_k`` of the best checkpoint).
PLAIN_KEYS: tuple[str, ...] = ("seed", "name", "allow_targets", "tags", "checkpoint")
TOP_LEVEL_KEYS: tuple[str, ...] = SLOTS + PLAIN_KEYS

#: Names :func:`vlzoo.build.build` injects (by parameter name) into each slot's nodes.
INJECTABLE: dict[str, frozenset[str]] = {
    "backbone": frozenset(),
    "evaluator": frozenset(),
    "optimizer": frozenset(),
    "scheduler": frozenset(),
    "paradigm": frozenset(
        {"backbone", "evaluator", "optimizer", "scheduler", "hidden_size", "vision_dim", "feature_grid", "input_size"}
    ),
    "data": frozenset({"tokenizer", "answer_format", "image_mean", "image_std", "image_size", "image_transform", "seed", "keep_raw_images"}),
    "trainer": frozenset({"logger", "callbacks", "default_root_dir", "enable_progress_bar", "plugins"}),
    "logger": frozenset({"experiment_name", "tracking_uri", "run_name", "artifact_location", "run_id", "tags"}),
}

_BASE = "_base_"
_TARGET = "_target_"
_PARTIAL = "_partial_"
_SPECIAL = (_TARGET, _PARTIAL)
#: a key path inside a recipe tree: mapping keys and list indices
_Path = tuple[Any, ...]


class RecipeError(ValueError):
    """A mistake in a recipe or an override: the message names the key, where it was set and,
    when possible, what was probably meant."""


def _dotted(path: _Path) -> str:
    return ".".join(str(p) for p in path)


def _suggest(name: str, options: Iterable[str]) -> str:
    """`` Did you mean X?`` for the nearest of ``options``, or nothing."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


def _dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


@dataclass
class Recipe:
    """A fully merged and resolved recipe.

    Attributes:
        data: the resolved recipe as plain dicts / lists / scalars (no ``_base_`` left,
            interpolations resolved).
        sources: dotted key path -> where it was set (a file path, ``override a.b=1``,
            ``slot swap trainer=cpu``, ``--allow-target``, ``checkpoint``).
        path: the recipe file, if it came from one.
        confirmed: the module prefixes the caller trusts on purpose (``--allow-target``,
            ``allow_targets=``); only these of the recipe's ``allow_targets`` take effect.
    """

    data: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    confirmed: tuple[str, ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        """The value at a dotted key path (``paradigm.box_loss_weight``), or ``default``."""
        node: Any = self.data
        for part in key.split(".") if key else []:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node[int(part)]
            else:
                return default
        return node

    def source(self, key: str) -> str:
        """Where the value at ``key`` (or its nearest enclosing node) was set."""
        parts = key.split(".")
        while parts:
            found = self.sources.get(".".join(parts))
            if found is not None:
                return found
            # a node's own source is that of any key under it
            prefix = ".".join(parts) + "."
            under = sorted(v for k, v in self.sources.items() if k.startswith(prefix))
            if under:
                return under[-1] if len(set(under)) == 1 else ", ".join(sorted(set(under)))
            parts.pop()
        return str(self.path) if self.path else "<recipe>"

    def slot(self, name: str) -> Any:
        """The node of a slot, ``None`` when the recipe leaves it out."""
        return self.data.get(name)

    @property
    def name(self) -> str:
        """The run name: the recipe's ``name`` key, else the file's stem, else ``recipe``."""
        if self.data.get("name"):
            return str(self.data["name"])
        return self.path.stem if self.path else "recipe"

    @property
    def seed(self) -> int | None:
        seed = self.data.get("seed")
        return None if seed is None else int(seed)

    @property
    def requested_targets(self) -> tuple[str, ...]:
        """The module prefixes the recipe's ``allow_targets`` asks to trust."""
        return tuple(str(p) for p in self.data.get("allow_targets") or [])

    @property
    def unconfirmed_targets(self) -> tuple[str, ...]:
        """Requested prefixes the caller has not confirmed (:func:`~vlzoo.config.validate`
        refuses them)."""
        return tuple(p for p in self.requested_targets if p not in self.confirmed)

    @property
    def allowed_prefixes(self) -> tuple[str, ...]:
        """The prefixes trusted beyond the reviewed callables: the recipe's ``allow_targets``
        that the caller confirmed."""
        return tuple(p for p in self.requested_targets if p in self.confirmed)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML: what runs and checkpoints store."""
        return _dump_yaml(self.data)

    def annotated(self) -> str:
        """The resolved recipe as YAML, each leaf followed by ``# <where it was set>``."""
        lines: list[str] = []
        self._annotate(self.data, (), 0, lines)
        return "\n".join(lines) + "\n"

    def _annotate(self, node: Any, path: _Path, indent: int, lines: list[str]) -> None:
        pad = "  " * indent
        items: Iterable[tuple[Any, Any]]
        if isinstance(node, Mapping):
            items = node.items()
        else:
            items = enumerate(node)
        for key, value in items:
            sub = path + (key,)
            head = f"{pad}{key}:" if isinstance(node, Mapping) else f"{pad}-"
            if isinstance(value, (Mapping, list)) and value:
                lines.append(head)
                self._annotate(value, sub, indent + 1, lines)
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
                text = text.removesuffix("...").strip()
                lines.append(f"{head} {text}  # {self.source(_dotted(sub))}")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists stay values)."""
    out: dict[str, Any] = {}
    if isinstance(data, Mapping) and data:
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif prefix:
        out[prefix] = data
    return out
