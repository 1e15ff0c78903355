"""The resolved recipe and its provenance, pinned for a small recipe tree that uses every merge
rule (``_base_`` chains and node-level ``_base_``, a changed ``_target_``, lists replacing, a
scalar turned mapping, ``null``, interpolation with ``oc.env`` / ``oc.select`` / a node
reference, an escaped literal, slot swaps and dotted overrides).

The pinned texts were written by the single-module ``vlzoo.config`` before it became a package
on OmegaConf's merge and override parsing; they pin that the move changed nothing. Regenerate
them only for an intended change of the rules: ``python tests/test_config_golden.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vlzoo.config import Recipe, load_recipe

HERE = Path(__file__).resolve().parent / "support" / "recipes" / "merging"
OVERRIDES = [
    "optimizer=sgd",
    "optimizer.momentum=0.9",
    "paradigm.decoder.width=8",
    "paradigm.extra.deep=1e-3",
    "tags={who: cli, new: [1, 2]}",
    "trainer.callbacks=[{_target_: lightning.pytorch.callbacks.LearningRateMonitor}]",
    "paradigm.aux={_target_: vlzoo.decoders.BoxHead, width: 2}",
    "paradigm.empty=",
    "seed=7",
]


def _load(overrides: list[str]) -> Recipe:
    return load_recipe(HERE / "main.yaml", overrides, recipes_dir=HERE)


def _texts(recipe: Recipe) -> tuple[str, str]:
    return recipe.to_yaml(), recipe.annotated().replace(str(HERE), "<merging>")


@pytest.mark.parametrize("overrides", [[], OVERRIDES], ids=["file", "with-overrides"])
def test_resolved_recipe_and_sources_are_as_pinned(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLZOO_TEST_UNSET_VARIABLE", raising=False)
    name = "with_overrides" if overrides else "file"
    resolved, annotated = _texts(_load(overrides))
    assert resolved == (HERE / f"expected_{name}.yaml").read_text()
    assert annotated == (HERE / f"expected_{name}_sources.txt").read_text()


if __name__ == "__main__":  # regenerate the pinned texts
    for name, overrides in (("file", []), ("with_overrides", OVERRIDES)):
        resolved, annotated = _texts(_load(overrides))
        (HERE / f"expected_{name}.yaml").write_text(resolved)
        (HERE / f"expected_{name}_sources.txt").write_text(annotated)
    sys.exit(0)
