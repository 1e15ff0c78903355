"""How a paradigm writes boxes into prompts and answers.

The datamodule knows the instruction of every task; only the paradigm knows how a location is
*said* (coordinate tokens, a ``<trigger>``, a ``[LOC]`` token ...).  A paradigm hands the
datamodule a small, picklable :class:`AnswerFormat` (it travels to dataloader workers), which
turns a sample - already in network-input pixels - into prompt and answer text.
"""

from __future__ import annotations

from vlzoo.structures import LOCALIZATION_TASKS, REFERENCE_START, REFERENCE_TOKENS, Sample

__all__ = ["AnswerFormat", "BOX_PLACEHOLDER", "plain_box_text", "spatial_reference_spans"]

#: Placeholder a dataset writes into a prompt where a box of ``Sample.prompt_boxes`` is referred
#: to (one per placeholder, in order), e.g. for REG.  The collate hands the format the sample in
#: input-frame pixels, so ``box_in_prompt`` receives input pixels.  A prompt may instead hold
#: the boxes' crop / box reference spans already (``reference_text("crop" | "box", k)``, one per
#: box, as ``vlzoo.load``'s ``reference_box`` writes): the backbone's reference encoder reads them.
BOX_PLACEHOLDER = "{box}"


def spatial_reference_spans(prompt: str) -> int:
    """How many crop / box reference spans (``<ref_start><ref>...`` / ``<ref_start><ref_box>...``)
    ``prompt`` holds."""
    return sum(prompt.count(REFERENCE_START + REFERENCE_TOKENS[m]) for m in ("crop", "box"))


def plain_box_text(box: list[float] | tuple[float, ...], input_size: tuple[int, int]) -> str:
    """Shikra-style plain text: ``[x1,y1,x2,y2]`` normalised to the (square) input, 3 decimals."""
    h, w = input_size
    x1, y1, x2, y2 = (float(v) for v in box)
    vals = [x1 / w, y1 / h, x2 / w, y2 / h]
    return "[" + ",".join(f"{min(max(v, 0.0), 1.0):.3f}" for v in vals) + "]"


class AnswerFormat:
    """Default format: text tasks answer with their reference text; boxes in prompts are plain
    Shikra text.  Paradigms subclass it and override :meth:`localization_answer` (and, when they
    feed boxes differently, :meth:`box_in_prompt`)."""

    #: tokens the backbone must add to the vocabulary for this format
    special_tokens: tuple[str, ...] = ()

    def box_in_prompt(self, box: list[float], input_size: tuple[int, int]) -> str:
        return plain_box_text(box, input_size)

    def format_prompt(self, sample: Sample, input_size: tuple[int, int]) -> str:
        prompt = sample.prompt
        boxes = sample.prompt_boxes.tolist()
        n = prompt.count(BOX_PLACEHOLDER)
        if n == 0 and boxes and spatial_reference_spans(prompt) == len(boxes):
            return prompt  # the boxes are crop / box references, already written as their spans
        if n != len(boxes):
            raise ValueError(
                f"sample {sample.image_id} ({sample.task}): prompt has {n} '{BOX_PLACEHOLDER}' "
                f"placeholders but Sample.prompt_boxes holds {len(boxes)} boxes (write one '{BOX_PLACEHOLDER}', "
                "or one crop / box reference span reference_text(modality, k), per box)"
            )
        for box in boxes:
            prompt = prompt.replace(BOX_PLACEHOLDER, self.box_in_prompt(box, input_size), 1)
        return prompt

    def format_answer(self, sample: Sample, input_size: tuple[int, int]) -> str:
        if sample.task in LOCALIZATION_TASKS:
            return self.localization_answer(sample, input_size)
        if sample.answer is None:
            raise ValueError(f"sample {sample.image_id}: text task '{sample.task}' has no reference answer")
        return sample.answer

    def localization_answer(self, sample: Sample, input_size: tuple[int, int]) -> str:
        """The answer of a localization task.  The default has no way to say a location."""
        raise ValueError(
            f"{type(self).__name__} cannot write an answer for task '{sample.task}': "
            "pick a paradigm that supports it (see docs/support_matrix.md)"
        )
