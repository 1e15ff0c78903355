"""Region references: a referring dataset whose referent is shown - a crop or a box of the image -
instead of named.

:class:`RegionReferences` wraps any dataset of referring samples (Shapes, RefCOCO ...): for a
``rec`` / ``res`` sample it replaces the expression (``targets.expressions[0]``) in the prompt by
the reference span :func:`~vlzoo.structures.reference_text` ``(modality, k)`` and puts the
target's box (``targets.boxes[0]``, original pixels) in ``Sample.prompt_boxes``; the backbone's
reference encoder turns the region into the k tokens (``crop``: cut out and encoded by the
vision tower; ``box``: the normalised box through an MLP).  AnyRef's visual references -
"segment <this region>." - and the sample ``vlzoo.load(...)(image, reference_box=...)`` writes.
The task and the targets stay the same, so the same evaluator scores it: an easy, positive-control
version of the referring task (the answer is given, as a region, in the question).  Other tasks
pass through unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from torch.utils.data import Dataset

from vlzoo.data.errors import DataError
from vlzoo.structures import Sample, reference_text

__all__ = ["RegionReferences"]

_REFERRING = ("rec", "res")


class RegionReferences(Dataset):
    """Any referring dataset with its referent given as a crop / box reference (see the module doc).

    Args:
        dataset: the referring dataset (e.g. a ``ShapesDataset`` or ``RefCocoDataset``).
        modality: ``crop`` or ``box``; the backbone's ``references.modalities`` must hold it.
        reference_tokens: k, the placeholders per reference; must equal the backbone's
            ``references.tokens`` (a recipe interpolates ``${backbone.references.tokens}``).
    """

    def __init__(self, *, dataset: Dataset, modality: Literal["crop", "box"] = "crop", reference_tokens: int = 4) -> None:
        if modality not in ("crop", "box"):
            raise ValueError(f"RegionReferences: modality must be 'crop' or 'box', got {modality!r}")
        self.dataset = dataset
        self.modality = modality
        self.span = reference_text(modality, int(reference_tokens))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample | None:
        sample = self.dataset[index]
        if sample is None or sample.task not in _REFERRING:
            return sample
        expressions = sample.targets.expressions or []
        if not expressions or expressions[0] not in sample.prompt:
            raise DataError(
                f"region references: item {index} ({sample.task}) has no expression in its prompt "
                f"{sample.prompt!r} to replace by the {self.modality} reference"
            )
        if len(sample.targets.boxes) == 0:
            raise DataError(f"region references: item {index} ({sample.task}) has no target box to show")
        if len(sample.prompt_boxes):
            raise DataError(f"region references: item {index} ({sample.task}) already has prompt boxes")
        box = sample.targets.boxes[:1].float()
        return replace(sample, prompt=sample.prompt.replace(expressions[0], self.span, 1), prompt_boxes=box)
