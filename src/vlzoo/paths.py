"""Where vlzoo's shipped files are, found from the installed package (the bottom layer: both the
recipe loader and the paradigm catalog need it, and the catalog must not import config)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["shipped_recipes_dir"]


def shipped_recipes_dir() -> Path | None:
    """The ``recipes/`` folder shipped with vlzoo (beside ``src/`` in a source checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "recipes"
        if candidate.is_dir():
            return candidate
    return None
