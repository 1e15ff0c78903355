"""Zero-shot cells: an off-the-shelf model (a local folder) tested as it is, by the same harness.

A part with ``zero_shot: true`` (:mod:`vlzoo.study.spec`) names Pixel2Seq recipes whose backbone
is a released model (Qwen2-VL, Qwen2.5-VL, PaliGemma, Kosmos-2, Florence-2, LLaVA); its cells
are never trained: no ``fit``, no budget, no stage-0 checkpoint.  The cell runs ``test`` on the
recipe's test splits - the model's native generation with the recipe's prompt template and the
family's codec, parsed and scored by the recipe's evaluator - and then the harness's cost
measures (latency per query and per object, tokens per object), exactly as for a trained cell.

What would make such a cell something else than the off-the-shelf model is refused, naming the
cell and the recipe key: a paradigm other than Pixel2Seq, a ``backbone.checkpoint``, no test
split (:func:`check_zero_shot`, before any run exists), and a codec whose tokens the model's
vocabulary lacks (:func:`check_vocabulary`, once the cell's model is built).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlzoo.study.spec import Cell, StudyError

__all__ = ["ZERO_SHOT_TAG", "check_zero_shot", "check_vocabulary", "zero_shot_problem"]

#: tag of a zero-shot cell's run (``"true"``); the report marks its rows
ZERO_SHOT_TAG = "vlzoo.zero_shot"


def zero_shot_problem(recipe: Any) -> str:
    """What keeps a resolved recipe from being a zero-shot cell ("" when nothing does)."""
    from vlzoo.config import locate
    from vlzoo.paradigms.pixel2seq import Pixel2Seq

    target = recipe.get("paradigm._target_")
    if not target:
        return "key 'paradigm._target_': the recipe has no paradigm (a zero-shot cell runs vlzoo.paradigms.Pixel2Seq)"
    cls = locate(str(target), recipe.allowed_prefixes)
    if not (isinstance(cls, type) and issubclass(cls, Pixel2Seq)):
        return (f"key 'paradigm._target_': {target} has heads or decoders that only training gives weights; a "
                "zero-shot cell runs the model's own generation through vlzoo.paradigms.Pixel2Seq with the "
                "family's codec")
    checkpoint = recipe.get("backbone.checkpoint")
    if checkpoint:
        return (f"key 'backbone.checkpoint' is {checkpoint!r}: a zero-shot cell is the off-the-shelf model as its "
                "folder holds it; set backbone.checkpoint=null (e.g. under the part's fixed)")
    if not recipe.get("data.test"):
        return "key 'data.test': a zero-shot cell is scored on the test splits, and the recipe has none"
    return ""


def check_zero_shot(cells: Sequence[Cell], *, extra_overrides: Sequence[str] = ()) -> None:
    """Raise :class:`StudyError` for the first supported zero-shot cell whose recipe cannot be
    used as it is (see :func:`zero_shot_problem`)."""
    from vlzoo.config import load_recipe

    for cell in cells:
        if not (cell.zero_shot and cell.supported):
            continue
        problem = zero_shot_problem(load_recipe(cell.recipe, [*cell.overrides, *extra_overrides]))
        if problem:
            raise StudyError(
                f"zero-shot cell {cell.index} [{cell.key}] (recipe {cell.recipe}): {problem}; or remove "
                "zero_shot from its part"
            )


def check_vocabulary(cell: Cell, model: Any) -> None:
    """Raise :class:`StudyError` when the built paradigm had to add tokens to the model's
    vocabulary (their embedding rows start untrained): the codec is not the model's own, so the
    released model cannot write its answers (e.g. ``BinsCodec`` on LLaVA)."""
    backbone = getattr(model, "backbone", None)
    # the ids the backbone's add_special_tokens created (rows the released weights do not have)
    new_ids = list(getattr(backbone, "_new_token_ids", None) or [])
    if not new_ids:
        return
    tokens = backbone.tokenizer.convert_ids_to_tokens(new_ids)
    shown = ", ".join(tokens[:4]) + (f" and {len(tokens) - 4} more" if len(tokens) > 4 else "")
    raise StudyError(
        f"zero-shot cell {cell.index} [{cell.key}] (recipe {cell.recipe}): key 'paradigm.codec': the answer "
        f"format's tokens {shown} are not in the model's vocabulary, so they would start untrained; use the "
        "family's own codec (its native tokens) or remove zero_shot from its part"
    )
