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
6. A recipe may construct only the reviewed callables of :mod:`vlzoo.config.targets`, checked by
   identity, plus what the *caller* trusts on purpose (``--allow-target PREFIX``,
   ``allow_targets=[...]``). A recipe's (or a checkpoint's) own ``allow_targets`` key grants
   nothing by itself: each prefix it names must be confirmed by the caller. Only the resolvers
   in :data:`~vlzoo.config.targets.ALLOWED_RESOLVERS` are resolved; argument names that switch
   on code loading (:data:`~vlzoo.config.targets.REFUSED_ARGUMENTS`) are refused.

Every key remembers which file or override set it (:attr:`Recipe.sources`), for ``vlzoo
print`` and for error messages.

The parts: :mod:`~vlzoo.config.recipe` (the :class:`Recipe` and its error),
:mod:`~vlzoo.config.layers` (files, ``_base_`` and merging, with provenance),
:mod:`~vlzoo.config.overrides`, :mod:`~vlzoo.config.loading` (finding recipes, interpolation,
the entry points), :mod:`~vlzoo.config.targets` (what a recipe may construct),
:mod:`~vlzoo.config.validation` and :mod:`~vlzoo.config.instantiation`. OmegaConf reads the YAML,
parses dotted overrides and resolves interpolations (after its grammar has shown which resolvers
a value calls); merging gives what ``OmegaConf.merge`` gives plus the ``_target_`` rule, in the
walk that carries each key's origin (:mod:`~vlzoo.config.layers` says why it is not a call to
``OmegaConf.merge``). vlzoo adds provenance, ``_base_``, slot swaps, the allowlist, the signature
checks and ``instantiate``.
"""

from __future__ import annotations

from vlzoo.config.instantiation import instantiate
from vlzoo.config.loading import (
    find_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_from_yaml,
    shipped_recipes_dir,
)
from vlzoo.config.overrides import apply_overrides
from vlzoo.config.recipe import INJECTABLE, SLOTS, TOP_LEVEL_KEYS, Recipe, RecipeError, flatten
from vlzoo.config.recipe import PLAIN_KEYS as PLAIN_KEYS  # reachable here as before the split
from vlzoo.config.targets import is_trusted, locate
from vlzoo.config.validation import DATA_COUNTS as DATA_COUNTS  # reachable here as before the split
from vlzoo.config.validation import check_trust, validate

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
