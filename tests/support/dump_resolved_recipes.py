"""Dump every shipped recipe resolved, to compare two versions of vlzoo.config.

    PYTHONPATH=<checkout A>/src python tests/support/dump_resolved_recipes.py <checkout A> a.json
    PYTHONPATH=<checkout B>/src python tests/support/dump_resolved_recipes.py <checkout B> b.json
    cmp a.json b.json

For each ``recipes/**/*.yaml`` it stores ``load_recipe(p).to_yaml()``, ``annotated()`` and the
sources (checkout paths replaced by ``<ROOT>``), or the error for slot files that are not
recipes on their own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vlzoo.config import load_recipe


def dump(root: Path) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for path in sorted((root / "recipes").rglob("*.yaml")):
        try:
            recipe = load_recipe(path)
        except Exception as err:  # noqa: BLE001 - the error message is part of what is compared
            out[str(path.relative_to(root))] = {"error": f"{type(err).__name__}: {err}".replace(str(root), "<ROOT>")}
            continue
        out[str(path.relative_to(root))] = {
            "yaml": recipe.to_yaml(),
            "annotated": recipe.annotated().replace(str(root), "<ROOT>"),
            "sources": {k: v.replace(str(root), "<ROOT>") for k, v in recipe.sources.items()},
        }
    return out


if __name__ == "__main__":
    root, target = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    result = dump(root)
    target.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"{len(result)} files, {sum('error' in v for v in result.values())} not recipes on their own")
