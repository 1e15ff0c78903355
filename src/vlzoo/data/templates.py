"""Instruction templates per task, shared by Shapes, COCO and RefCOCO.

``{expr}`` is a referring expression, ``{category}`` / ``{plural}`` a category name and
``{box}`` the box placeholder the :class:`~vlzoo.data.answers.AnswerFormat` fills.

A recipe may replace them with a model family's own task wording (``data.instructions``, see
:func:`instruction_table`): a released grounding VLM answers its documented prompt syntax
(PaliGemma's ``detect {expr}``, Kosmos-2's ``<phrase> {expr}</phrase>`` after ``<grounding>``,
Florence-2's task tokens), not vlzoo's "where is ...?".  Those tables are plain strings whose
only fields are the task's own (:data:`INSTRUCTION_FIELDS`); nothing in them is evaluated.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "INSTRUCTIONS",
    "INSTRUCTION_FIELDS",
    "FAMILY_INSTRUCTIONS",
    "instruction",
    "instruction_table",
    "reword",
    "worded",
    "plural",
]

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


#: the fields an instruction of each task may name (``{box}`` stays for the answer format)
INSTRUCTION_FIELDS: dict[str, tuple[str, ...]] = {
    "rec": ("expr",), "res": ("expr",), "grec": ("expr",), "gres": ("expr",),
    "det": ("category", "plural"), "seg": ("category", "plural"), "pose": ("category", "plural"),
    "reg": ("box",), "caption": (),
}

#: each family's documented task syntax (``data.instructions: <family>``).  PaliGemma: the
#: ``detect`` / ``segment`` prefixes of its prompt-syntax page (the layout adds ``<bos>`` and the
#: closing ``\n``); Kosmos-2: the bare expression as a phrase, after the template's
#: ``<grounding>``; Florence-2: the processor's task tokens, which :class:`Florence2Template`
#: expands to the processor's sentences ("Locate the phrases in the caption: ...").  Qwen2-VL
#: and Qwen2.5-VL have no task syntax (free chat text): give their wording as a mapping.
FAMILY_INSTRUCTIONS: dict[str, dict[str, str]] = {
    "paligemma": {"rec": "detect {expr}", "res": "segment {expr}", "det": "detect {category}", "seg": "segment {category}"},
    "kosmos2": {"rec": "<phrase> {expr}</phrase>"},
    "florence2": {
        "rec": "<CAPTION_TO_PHRASE_GROUNDING>{expr}",
        "res": "<REFERRING_EXPRESSION_SEGMENTATION>{expr}",
        "det": "<OPEN_VOCABULARY_DETECTION>{category}",
    },
}


def instruction_table(value: Any, *, key: str = "data.instructions") -> dict[str, str]:
    """The ``{task: wording}`` table a recipe's ``key`` gives: ``null`` (vlzoo's own wording), a
    family of :data:`FAMILY_INSTRUCTIONS`, or a mapping of tasks to one wording each.

    A wording names only its task's fields (:data:`INSTRUCTION_FIELDS`), as plain ``{name}``:
    attribute or index access, conversions and format specs are refused, so a recipe's text can
    never reach into the objects it is filled with."""
    if value is None:
        return {}
    if isinstance(value, str):
        if value not in FAMILY_INSTRUCTIONS:
            raise ValueError(
                f"key {key!r}: unknown family {value!r}; use one of {sorted(FAMILY_INSTRUCTIONS)} or a mapping "
                f"of tasks to wordings, e.g. {{rec: 'detect {{expr}}'}}"
            )
        return dict(FAMILY_INSTRUCTIONS[value])
    if not isinstance(value, Mapping):
        raise ValueError(f"key {key!r}: expected a family name or a mapping of tasks to wordings, got {value!r}")
    table: dict[str, str] = {}
    for task, text in value.items():
        where = f"{key}.{task}"
        if task not in INSTRUCTION_FIELDS:
            raise ValueError(f"key {where!r}: unknown task {task!r}; tasks with instructions are {list(INSTRUCTION_FIELDS)}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"key {where!r}: expected one non-empty wording (a string), got {text!r}")
        allowed = INSTRUCTION_FIELDS[task]
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as err:
            raise ValueError(f"key {where!r}: {text!r} is not a valid wording ({err}); write braces as {{{{ }}}}") from None
        for _, field, spec, conversion in parts:
            if field is None:
                continue
            if field not in allowed or spec or conversion:
                shown = ", ".join("{" + f + "}" for f in allowed) or "no fields"
                raise ValueError(
                    f"key {where!r}: {text!r} names {{{field}{'!' + conversion if conversion else ''}"
                    f"{':' + spec if spec else ''}}}; a {task} wording takes {shown}, as plain names"
                )
        if task in ("rec", "res", "grec", "gres") and "{expr}" not in text:
            raise ValueError(f"key {where!r}: {text!r} leaves out the expression; write {{expr}} where it goes")
        table[str(task)] = text
    return table


def _fill(text: str, **fields: str) -> str:
    if "category" in fields and "plural" not in fields:
        fields = {**fields, "plural": plural(fields["category"])}
    # leave {box} in place: the answer format substitutes it
    return text.format(box="{box}", **fields)


def worded(table: Mapping[str, str], task: str, *, expr: str | None = None, category: str | None = None,
           where: str = "") -> str | None:
    """``task``'s instruction in ``table``'s wording around ``expr`` / ``category`` (``None``
    when the table has no wording for ``task``); ``ValueError`` when the field it needs is
    missing (``where`` says which sample)."""
    text = table.get(task)
    if text is None:
        return None
    fields: dict[str, str] = {}
    if task in ("rec", "res", "grec", "gres"):
        if not expr:
            raise ValueError(f"{where}data.instructions.{task} needs the referring expression, and there is none")
        fields["expr"] = str(expr)
    elif task in ("det", "seg", "pose"):
        if not category:
            raise ValueError(f"{where}data.instructions.{task} needs the category name, and there is none")
        fields["category"] = str(category)
    return _fill(text, **fields)


def reword(sample: Any, table: Mapping[str, str]) -> Any:
    """``sample`` with its instruction in ``table``'s wording for its task (unchanged when the
    table has none).  The expression is the sample's ``targets.expressions[0]``, the category its
    ``category_name``; a sample without the field its wording needs raises ``ValueError``."""
    from dataclasses import replace

    expressions = list(sample.targets.expressions or [])
    text = worded(table, sample.task, expr=expressions[0] if expressions else None, category=sample.category_name,
                  where=f"sample {sample.image_id} (task {sample.task}): ")
    return sample if text is None else replace(sample, prompt=text)


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
    return _fill(text, **fields)
