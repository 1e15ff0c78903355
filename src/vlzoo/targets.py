"""What a recipe may construct: kept importable here; the list lives in :mod:`vlzoo.config.targets`.

The reviewed callables are checked by identity (see :mod:`vlzoo.config.targets` and
``docs/recipes.md``, "What a recipe may construct").
"""

from __future__ import annotations

from vlzoo.config.targets import (
    ALLOWED_RESOLVERS,
    COMPONENT_MODULES,
    NOT_FOR_RECIPES,
    REFUSED_ARGUMENTS,
    REVIEWED_PACKAGES,
    RUN_PARTS,
    THIRD_PARTY,
    is_reviewed,
    reviewed_names,
)

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
