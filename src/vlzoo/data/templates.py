"""Instruction templates per task, shared by Shapes, COCO and RefCOCO.

``{expr}`` is a referring expression, ``{category}`` / ``{plural}`` a category name and
``{box}`` the box placeholder the :class:`~vlzoo.data.answers.AnswerFormat` fills.
"""

from __future__ import annotations

import numpy as np

__all__ = ["INSTRUCTIONS", "instruction", "plural"]

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "rec": ("where is {expr}?", "locate {expr}.", "find {expr}.", "give the box of {expr}."),
    "res": ("segment {expr}.", "give the mask of {expr}.", "find the pixels of {expr}."),
    # generalized referring: the expression may denote no object or several ("every red shape")
    "grec": ("find {expr}.", "locate {expr}.", "give the boxes of {expr}."),
    "gres": ("segment {expr}.", "give the masks of {expr}.", "find the pixels of {expr}."),
    "det": ("detect every {category}.", "find all {plural}.", "where are the {plural}?"),
    "seg": ("segment every {category}.", "give the masks of all {plural}.", "segment all {plural}."),
    "pose": (
        "find the keypoints of every {category}.",
        "locate the keypoints of all {plural}.",
        "give the pose of each {category}.",
    ),
    "reg": (
        "what is the shape in {box}?",
        "describe the region {box}.",
        "refer to the object in {box}.",
    ),
    "caption": ("describe the image.", "what shapes are in the image?", "write a caption for the image."),
}


def plural(name: str) -> str:
    """English plural of a category name (good enough for Shapes and COCO names)."""
    if name.endswith(("s", "x", "sh", "ch")):
        return name + "es"
    if name.endswith("y") and name[-2:-1] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


def instruction(task: str, rng: np.random.Generator | None = None, **fields: str) -> str:
    """One instruction for ``task`` with ``fields`` filled in (the first template without ``rng``)."""
    options = INSTRUCTIONS[task]
    text = options[0] if rng is None else options[int(rng.integers(len(options)))]
    if "category" in fields and "plural" not in fields:
        fields = {**fields, "plural": plural(fields["category"])}
    # leave {box} in place: the answer format substitutes it
    return text.format(box="{box}", **fields)
