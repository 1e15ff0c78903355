"""The paradigm catalog and the support matrix page in docs."""

from __future__ import annotations

from pathlib import Path

from vlzoo.paradigms.catalog import PARADIGMS, list_paradigms, support_matrix
from vlzoo.structures import TASKS

ROOT = Path(__file__).resolve().parents[2]


def test_catalog_lists_the_four_paradigms_with_known_tasks():
    names = list(list_paradigms())
    assert names == ["pixel2seq", "pixel2emb", "heatmap", "attention_keypoints"]
    for cls in PARADIGMS:
        assert cls.supported_tasks and set(cls.supported_tasks) <= set(TASKS)
    assert "language_modeling" in list_paradigms(include_stage0=True)


def test_docs_support_matrix_is_the_generated_one():
    page = (ROOT / "docs" / "support_matrix.md").read_text()
    table = page.split("<!-- support-matrix:start -->\n", 1)[1].split("<!-- support-matrix:end -->", 1)[0]
    assert table == support_matrix(ROOT / "recipes"), "regenerate docs/support_matrix.md from support_matrix()"


def test_every_shapes_recipe_a_cell_points_to_is_supported():
    for path in (ROOT / "recipes" / "shapes").glob("*_*.yaml"):
        for name, cls in list_paradigms().items():
            if path.stem.startswith(name + "_"):
                task = path.stem[len(name) + 1 :]
                if task in TASKS:
                    assert task in cls.supported_tasks, path
