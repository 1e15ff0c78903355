"""The paradigms vlzoo ships, listed explicitly (no registry filled by import side effects),
and the paradigm x task support matrix derived from their ``supported_tasks``."""

from __future__ import annotations

from pathlib import Path

from vlzoo.paradigms.attention_keypoints import AttentionKeypoints
from vlzoo.paradigms.base import BaseParadigm
from vlzoo.paradigms.heatmap import HeatmapMatching
from vlzoo.paradigms.language_modeling import LanguageModeling
from vlzoo.paradigms.pixel2emb import Pixel2Emb
from vlzoo.paradigms.pixel2seq import Pixel2Seq
from vlzoo.paths import shipped_recipes_dir
from vlzoo.structures import TASKS

__all__ = ["PARADIGMS", "list_paradigms", "support_matrix"]

#: The localization paradigms, in the order the docs and studies list them.
PARADIGMS: tuple[type[BaseParadigm], ...] = (Pixel2Seq, Pixel2Emb, HeatmapMatching, AttentionKeypoints)


def list_paradigms(*, include_stage0: bool = False) -> dict[str, type[BaseParadigm]]:
    """``{name: class}`` of the shipped paradigms (``language_modeling`` too when asked)."""
    classes = PARADIGMS + ((LanguageModeling,) if include_stage0 else ())
    return {cls.name: cls for cls in classes}


def support_matrix(recipes_dir: str | Path | None = None) -> str:
    """A Markdown table: one row per paradigm, one column per task.

    ``recipe`` marks a supported task with a shipped tiny Shapes recipe
    (``recipes/shapes/<paradigm>_<task>.yaml``), ``yes`` one supported without such a recipe,
    ``-`` an unsupported one."""
    root = Path(recipes_dir) if recipes_dir is not None else shipped_recipes_dir()
    lines = ["| paradigm | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for name, cls in list_paradigms(include_stage0=True).items():
        cells = []
        for task in TASKS:
            if task not in cls.supported_tasks:
                cells.append("-")
            elif root is not None and (root / "shapes" / f"{name}_{task}.yaml").is_file():
                cells.append("recipe")
            else:
                cells.append("yes")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
