"""From a file, a mapping or a stored text to a resolved :class:`~vlzoo.config.Recipe`.

This module owns finding recipes (a path, a name under a ``recipes/`` folder, the folder vlzoo
ships), the order of the steps (``_base_`` chain, overrides, ``--allow-target``, the run name,
interpolation, the top-level keys) and interpolation itself: OmegaConf resolves ``${...}``
after all merging, but only once every resolver the recipe calls has been found, with
OmegaConf's own grammar parser, in :data:`~vlzoo.config.targets.ALLOWED_RESOLVERS`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from omegaconf.grammar_parser import OmegaConfGrammarParser, parse

from vlzoo.config.layers import Layer, expand_bases, load_file, read_yaml
from vlzoo.config.overrides import apply_overrides
from vlzoo.config.recipe import TOP_LEVEL_KEYS, Recipe, RecipeError, _dotted, _Path, _suggest
from vlzoo.config.targets import ALLOWED_RESOLVERS
from vlzoo.paths import shipped_recipes_dir

__all__ = ["load_recipe", "recipe_from_dict", "recipe_from_yaml", "find_recipe", "shipped_recipes_dir"]


# --- finding recipes ------------------------------------------------------------------------
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


# --- interpolation ----------------------------------------------------------------------------
def _resolver_names(tree: Any) -> Iterator[str]:
    """The names of the resolvers an OmegaConf parse tree calls, nested calls included (a
    resolver name that is itself an interpolation comes out as its text, ``${x}``)."""
    if isinstance(tree, OmegaConfGrammarParser.InterpolationResolverContext):
        yield tree.resolverName().getText()
    for child in getattr(tree, "children", None) or ():
        yield from _resolver_names(child)


def _check_resolvers(node: Any, path: _Path, sources: Mapping[str, str]) -> None:
    """Refuse every resolver but :data:`~vlzoo.config.targets.ALLOWED_RESOLVERS` before OmegaConf
    runs any: a resolver is a function call, and other packages may register their own. The
    strings are read by OmegaConf's grammar, so an escape (``\\${``) is read as OmegaConf will."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            _check_resolvers(value, path + (key,), sources)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_resolvers(value, path + (i,), sources)
    elif isinstance(node, str) and "${" in node:
        try:
            names = list(_resolver_names(parse(node)))
        except GrammarParseError:
            return  # not an interpolation OmegaConf can read: resolving reports it, with the key
        for name in names:
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


# --- building a Recipe ----------------------------------------------------------------------
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
    layer = expand_bases(copy.deepcopy(dict(data)), source, Path.cwd() if path is None else path.parent, (), ())
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
    layer = load_file(file)
    return _finish(layer, overrides=overrides, allow_targets=allow_targets, path=file, recipes_dir=recipes_dir,
                   trust_own=True)


def recipe_from_yaml(text: str, *, source: str = "<checkpoint>") -> Recipe:
    """A :class:`Recipe` from an already resolved YAML text (a run artifact or checkpoint).
    Its ``allow_targets`` are not trusted: rebuild it with :func:`recipe_from_dict`
    (``trust_own_allow_targets=False, allow_targets=[...]``) to confirm them."""
    data = read_yaml(text, source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
    return _finish(Layer.of(data, source), overrides=(), allow_targets=(), path=None, recipes_dir=None, trust_own=False)


def _finish(
    layer: Layer,
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
