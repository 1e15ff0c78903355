"""Recipes: load, merge, override, validate and instantiate.

A recipe is YAML with flat top-level slots (see :data:`SLOTS`).  The rules (``docs/recipes.md``):

1. ``_base_: [a.yaml, b.yaml]`` merges the files left to right, then the file's own body; paths
   are relative to the file.  ``_base_`` may also appear inside any mapping node, whose base is
   then the *content* of the named files (e.g. ``trainer: {_base_: ../trainer/cpu.yaml}``).
   Mappings merge key by key, lists and scalars replace.
2. A node whose ``_target_`` differs from its base's replaces that node whole.
3. Overrides: ``slot=name`` swaps a whole slot for ``recipes/<slot>/<name>.yaml`` (``slot=null``
   removes it); ``a.b.c=value`` sets one value.  Precedence:
   bases < file < slot swaps < dotted overrides.
4. ``${...}`` interpolation (OmegaConf) is resolved after all merging.
5. :func:`validate` checks, before anything heavy is built, that every ``_target_`` is allowed
   and importable and that every argument binds against its signature.
6. A recipe may construct only the reviewed callables of :mod:`vlzoo.targets`, checked by
   identity, plus what the *caller* trusts on purpose (``--allow-target PREFIX``,
   ``allow_targets=[...]``). A recipe's (or a checkpoint's) own ``allow_targets`` key grants
   nothing by itself: each prefix it names must be confirmed by the caller. Only the resolvers
   in :data:`vlzoo.targets.ALLOWED_RESOLVERS` are resolved; argument names that switch on code
   loading (:data:`vlzoo.targets.REFUSED_ARGUMENTS`) are refused.

Every key remembers which file or override set it (:attr:`Recipe.sources`), for ``vlzoo
print`` and for error messages.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlzoo.targets import ALLOWED_RESOLVERS, REFUSED_ARGUMENTS, REVIEWED_PACKAGES, is_reviewed

__all__ = [
    "RecipeError",
    "Recipe",
    "SLOTS",
    "TOP_LEVEL_KEYS",
    "INJECTABLE",
    "load_recipe",
    "recipe_from_yaml",
    "recipe_from_dict",
    "shipped_recipes_dir",
    "find_recipe",
    "apply_overrides",
    "is_trusted",
    "locate",
    "validate",
    "check_trust",
    "instantiate",
    "flatten",
]

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
    "data": frozenset({"tokenizer", "answer_format", "image_mean", "image_std", "image_size", "seed", "keep_raw_images"}),
    "trainer": frozenset({"logger", "callbacks", "default_root_dir", "enable_progress_bar", "plugins"}),
    "logger": frozenset({"experiment_name", "tracking_uri", "run_name", "artifact_location", "run_id", "tags"}),
}

_BASE = "_base_"
_TARGET = "_target_"
_PARTIAL = "_partial_"
_SPECIAL = (_TARGET, _PARTIAL)
_Path = tuple[Any, ...]


class RecipeError(ValueError):
    """A mistake in a recipe or an override: the message names the key, where it was set and,
    when possible, what was probably meant."""


# --------------------------------------------------------------------------------------------
# YAML with YAML 1.2 floats (``1e-4`` is a float, not a string as in PyYAML's YAML 1.1)
# --------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from None


def _dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------
def _dotted(path: _Path) -> str:
    return ".".join(str(p) for p in path)


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
        """Requested prefixes the caller has not confirmed (:func:`validate` refuses them)."""
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


# --------------------------------------------------------------------------------------------
# Loading and merging with provenance
# --------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """A (partial) recipe tree plus, for each leaf path relative to its root, its source."""

    data: Any
    prov: dict[_Path, str]


def _leaf_paths(node: Any, prefix: _Path = ()) -> Iterator[_Path]:
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            yield from _leaf_paths(value, prefix + (key,))
    else:
        yield prefix


def _layer_of(data: Any, source: str) -> _Layer:
    return _Layer(data, {p: source for p in _leaf_paths(data)})


def _target_changed(base: Any, over: Any) -> bool:
    return (
        isinstance(base, Mapping)
        and isinstance(over, Mapping)
        and _TARGET in over
        and _TARGET in base
        and over[_TARGET] != base[_TARGET]
    )


def _drop_under(prov: dict[_Path, str], path: _Path) -> None:
    n = len(path)
    for key in [k for k in prov if k[:n] == path]:
        del prov[key]


def _merge_at(dst: _Layer, over: _Layer, at: _Path = ()) -> None:
    """Merge ``over`` into ``dst`` at node path ``at`` (in place).  Mappings merge key by key,
    lists and scalars replace, a changed ``_target_`` replaces the node whole."""
    parent: Any = dst.data
    for key in at[:-1]:
        parent = parent[key]
    current = parent[at[-1]] if at else dst.data
    if isinstance(current, dict) and isinstance(over.data, Mapping) and not _target_changed(current, over.data):
        for key, value in over.data.items():
            sub = _Layer(value, {p[1:]: s for p, s in over.prov.items() if p[:1] == (key,)})
            if key in current and isinstance(current[key], dict) and isinstance(value, Mapping):
                _merge_at(dst, sub, at + (key,))
            else:
                _drop_under(dst.prov, at + (key,))
                current[key] = copy.deepcopy(value)
                dst.prov.update({at + (key,) + p: s for p, s in sub.prov.items()})
        return
    _drop_under(dst.prov, at)
    replacement = copy.deepcopy(over.data)
    if at:
        parent[at[-1]] = replacement
    else:
        dst.data = replacement
    dst.prov.update({at + p: s for p, s in over.prov.items()})


def _load_file(path: Path, chain: tuple[Path, ...] = ()) -> _Layer:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise RecipeError(f"recipe _base_ cycle: {cycle}")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    data = _parse_yaml(path.read_text(), str(path))
    if data is None:
        data = {}
    return _expand_bases(data, str(path), path.parent, chain + (path,), ())


def _expand_bases(node: Any, source: str, folder: Path, chain: tuple[Path, ...], at: _Path) -> _Layer:
    """A layer for ``node`` (read from ``source``) with every ``_base_`` inside it expanded."""
    if isinstance(node, list):
        items = [_expand_bases(v, source, folder, chain, at + (i,)) for i, v in enumerate(node)]
        # a list is a leaf for merging: it replaces whole
        return _Layer([it.data for it in items], {(): source})
    if not isinstance(node, Mapping):
        return _Layer(node, {(): source})
    bases = node.get(_BASE)
    result = _Layer({}, {})
    if bases is not None:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            where = _dotted(at + (_BASE,)) or _BASE
            raise RecipeError(f"recipe key {where} (in {source}) must be a file path or a list of file paths")
        for base in bases:
            base_path = Path(base)
            if not base_path.is_absolute():
                base_path = folder / base_path
            if not base_path.is_file():
                where = _dotted(at + (_BASE,)) or _BASE
                raise RecipeError(f"recipe key {where} (in {source}) names {base}, but {base_path} does not exist")
            _merge_at(result, _load_file(base_path, chain))
    body: dict[str, Any] = {}
    body_prov: dict[_Path, str] = {}
    for key, value in node.items():
        if key == _BASE:
            continue
        sub = _expand_bases(value, source, folder, chain, at + (key,))
        body[key] = sub.data
        body_prov.update({(key,) + p: s for p, s in sub.prov.items()})
    if bases is None:
        return _Layer(body, body_prov if body else {(): source})
    if body:
        _merge_at(result, _Layer(body, body_prov))
    return result


# --------------------------------------------------------------------------------------------
# Finding recipes
# --------------------------------------------------------------------------------------------
def shipped_recipes_dir() -> Path | None:
    """The ``recipes/`` folder shipped with vlzoo (beside ``src/`` in a source checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "recipes"
        if candidate.is_dir():
            return candidate
    return None


def _recipe_roots(recipe_path: Path | None, recipes_dir: str | Path | None) -> list[Path]:
    roots: list[Path] = []
    if recipes_dir is not None:
        roots.append(Path(recipes_dir))
    if recipe_path is not None:
        for parent in recipe_path.resolve().parents:
            if parent.name == "recipes":
                roots.append(parent)
                break
    roots.append(Path.cwd() / "recipes")
    shipped = shipped_recipes_dir()
    if shipped is not None:
        roots.append(shipped)
    unique: list[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in [u.resolve() for u in unique]:
            unique.append(root)
    return unique


def find_recipe(name: str | Path, *, recipes_dir: str | Path | None = None) -> Path:
    """A recipe file from a path, or from a name relative to a recipes folder
    (``shapes/pixel2seq`` -> ``recipes/shapes/pixel2seq.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    tried = [str(path)]
    for root in _recipe_roots(None, recipes_dir):
        for candidate in (root / path, root / f"{path}.yaml"):
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    raise RecipeError(
        f"recipe {name} not found (looked at {', '.join(dict.fromkeys(tried))}); `vlzoo recipes` lists them"
    )


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------
def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form key=value (slot=name or a.b.c=value)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or not re.fullmatch(r"[A-Za-z_][\w\-]*(\.[\w\-]+)*", key):
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


def _parse_override_value(key: str, raw: str, text: str) -> Any:
    """The YAML value of an override; when it is not valid YAML, the message names the override
    and shows how to pass the value as text (quoted for YAML, inside quotes for the shell)."""
    try:
        return yaml.load(raw, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
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


def apply_overrides(
    layer_data: dict[str, Any],
    sources: dict[str, str],
    overrides: Sequence[str],
    *,
    roots: Sequence[Path],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply command-line overrides to an (unresolved) recipe tree: slot swaps first, then
    dotted values, each in the order given.  Returns the new tree and sources."""
    layer = _Layer(copy.deepcopy(layer_data), {tuple(k.split(".")) if k else (): v for k, v in sources.items()})
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
        node = _load_file(_slot_file(slot, name, roots))
        node.prov = {p: f"slot swap {text} ({s})" for p, s in node.prov.items()}
        _drop_under(layer.prov, (slot,))
        layer.data[slot] = node.data
        layer.prov.update({(slot,) + p: s for p, s in node.prov.items()})
    for key, raw, text in values:
        value = _parse_override_value(key, raw, text) if raw.strip() else ""
        path = tuple(key.split("."))
        node: Any = layer.data
        for depth, part in enumerate(path[:-1]):
            if not isinstance(node, dict):
                raise RecipeError(f"override {text}: {_dotted(path[:depth])} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict):
            raise RecipeError(f"override {text}: {_dotted(path[:-1])} is not a mapping")
        over = _Layer(value, {p: f"override {text}" for p in _leaf_paths(value)})
        if isinstance(node.get(path[-1]), dict) and isinstance(value, Mapping):
            _merge_at(layer, over, path)
        else:
            _drop_under(layer.prov, path)
            node[path[-1]] = copy.deepcopy(value)
            layer.prov.update({path + p: s for p, s in over.prov.items()})
    return layer.data, {_dotted(p): s for p, s in layer.prov.items()}


# --------------------------------------------------------------------------------------------
# Building a Recipe
# --------------------------------------------------------------------------------------------
#: ``${name:`` where ``name`` is an OmegaConf resolver (not preceded by the escape ``\\``).
_RESOLVER_CALL = re.compile(r"(?<!\\)\$\{\s*([^\s:{}]+)\s*:")


def _check_resolvers(node: Any, path: _Path, sources: Mapping[str, str]) -> None:
    """Refuse every resolver but :data:`vlzoo.targets.ALLOWED_RESOLVERS` before OmegaConf
    runs any: a resolver is a function call, and other packages may register their own."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            _check_resolvers(value, path + (key,), sources)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_resolvers(value, path + (i,), sources)
    elif isinstance(node, str):
        for name in _RESOLVER_CALL.findall(node):
            if name not in ALLOWED_RESOLVERS:
                key = _dotted(path)
                raise RecipeError(
                    f"recipe key {key} (set in {sources.get(key, '?')}): the interpolation resolver '{name}' is "
                    f"not allowed: a recipe may use {', '.join(sorted(ALLOWED_RESOLVERS))} and plain "
                    f"${{key.path}} references (a resolver is a function call, and a recipe is data). Write the "
                    "value itself, or escape a literal as \\${...}."
                )


def _resolve(data: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    _check_resolvers(data, (), sources)
    try:
        conf = OmegaConf.create(data)
        resolved = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        where = f" (set in {sources.get(key, '?')})" if key else ""
        message = str(err).splitlines()[0]
        raise RecipeError(f"recipe key {key or '?'}{where}: cannot resolve interpolation: {message}") from None
    assert isinstance(resolved, dict)
    return resolved


def recipe_from_dict(
    data: Mapping[str, Any],
    *,
    overrides: Sequence[str] = (),
    allow_targets: Sequence[str] = (),
    source: str = "<dict>",
    recipes_dir: str | Path | None = None,
    path: Path | None = None,
    trust_own_allow_targets: bool = True,
) -> Recipe:
    """A :class:`Recipe` from an in-memory mapping (``_base_`` paths relative to the current
    directory), with overrides applied and interpolations resolved.

    ``trust_own_allow_targets=False`` is for mappings that were not written by the caller (a
    checkpoint's stored recipe): their ``allow_targets`` then count only where ``allow_targets``
    repeats them."""
    layer = _expand_bases(copy.deepcopy(dict(data)), source, Path.cwd() if path is None else path.parent, (), ())
    return _finish(layer, overrides=overrides, allow_targets=allow_targets, path=path, recipes_dir=recipes_dir,
                   trust_own=trust_own_allow_targets)


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    allow_targets: Sequence[str] = (),
    recipes_dir: str | Path | None = None,
) -> Recipe:
    """Load a recipe file (or a shipped recipe by name) with its ``_base_`` chain, apply
    command-line ``overrides`` and extra allowed target prefixes, resolve interpolations."""
    file = find_recipe(path, recipes_dir=recipes_dir)
    layer = _load_file(file)
    return _finish(layer, overrides=overrides, allow_targets=allow_targets, path=file, recipes_dir=recipes_dir,
                   trust_own=True)


def recipe_from_yaml(text: str, *, source: str = "<checkpoint>") -> Recipe:
    """A :class:`Recipe` from an already resolved YAML text (a run artifact or checkpoint).
    Its ``allow_targets`` are not trusted: rebuild it with :func:`recipe_from_dict`
    (``trust_own_allow_targets=False, allow_targets=[...]``) to confirm them."""
    data = _parse_yaml(text, source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
    layer = _layer_of(data, source)
    return _finish(layer, overrides=(), allow_targets=(), path=None, recipes_dir=None, trust_own=False)


def _finish(
    layer: _Layer,
    *,
    overrides: Sequence[str],
    allow_targets: Sequence[str],
    path: Path | None,
    recipes_dir: str | Path | None,
    trust_own: bool,
) -> Recipe:
    if not isinstance(layer.data, dict):
        raise RecipeError(f"{path or 'recipe'}: a recipe must be a mapping of slots, got {type(layer.data).__name__}")
    sources = {_dotted(p): s for p, s in layer.prov.items() if p}
    data, sources = apply_overrides(layer.data, sources, overrides, roots=_recipe_roots(path, recipes_dir))
    # what the caller trusts on purpose: --allow-target, and the allow_targets of a recipe the
    # caller wrote or chose (a file, a mapping, an override) - not those of a stored recipe
    own = data.get("allow_targets") if trust_own else None
    confirmed = [*(own if isinstance(own, list) else []), *allow_targets]
    if allow_targets:
        current = list(data.get("allow_targets") or [])
        for prefix in allow_targets:
            if prefix not in current:
                current.append(prefix)
        data["allow_targets"] = current
        sources["allow_targets"] = "--allow-target " + " ".join(allow_targets)
    if path is not None and data.get("name") is None:
        # the run name travels with the recipe into runs and checkpoints
        data["name"] = path.stem
        sources["name"] = f"file name of {path}"
    resolved = _resolve(data, sources)
    sources = {k: v for k, v in sources.items() if k}
    _check_top_level(resolved, sources)
    return Recipe(data=resolved, sources=sources, path=path, confirmed=tuple(dict.fromkeys(str(p) for p in confirmed)))


def _check_top_level(data: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            where = sources.get(str(key)) or next((v for k, v in sources.items() if k.startswith(f"{key}.")), "?")
            raise RecipeError(
                f"recipe key {key} (set in {where}) is not a recipe slot.{_suggest(str(key), TOP_LEVEL_KEYS)} "
                f"Top-level keys are: {', '.join(TOP_LEVEL_KEYS)}."
            )
    allow = data.get("allow_targets")
    if allow is not None and (not isinstance(allow, list) or not all(isinstance(p, str) and p for p in allow)):
        raise RecipeError(
            f"recipe key allow_targets (set in {sources.get('allow_targets', '?')}) must be a list of module prefixes"
        )


# --------------------------------------------------------------------------------------------
# Targets: the reviewed callables, what the caller trusts, and import
# --------------------------------------------------------------------------------------------
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

    The object the path resolves to must be on the reviewed list (:mod:`vlzoo.targets`; checked
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


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


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
        if _TARGET not in node:
            raise RecipeError(f"recipe key {slot} (set in {recipe.source(slot)}) has no _target_")
        for path, sub in _iter_nodes(node, (slot,)):
            _validate_node(recipe, path, sub, prefixes, frozenset(injectable.get(slot, ())))
    _check_data_counts(recipe)
    seed = recipe.data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RecipeError(f"recipe key seed (set in {recipe.source('seed')}) must be an integer, got {seed!r}")


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
    try:
        obj = locate(node[_TARGET], prefixes)
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
                f"recipe key {arg_key} (set in {recipe.source(arg_key)}): {node[_TARGET]} has no parameter "
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


# --------------------------------------------------------------------------------------------
# Instantiation
# --------------------------------------------------------------------------------------------
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


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists stay values)."""
    out: dict[str, Any] = {}
    if isinstance(data, Mapping) and data:
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif prefix:
        out[prefix] = data
    return out
