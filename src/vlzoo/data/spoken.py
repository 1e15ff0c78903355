"""Spoken references: a referring dataset whose expressions are heard instead of read.

:class:`SpokenShapesDataset` is Spoken Shapes; :class:`SpokenReferences` wraps any dataset of referring samples (Shapes, RefCOCO ...): for a
``rec`` / ``res`` sample it synthesizes the expression (``targets.expressions[0]``) with a voice
and speed drawn from ``(seed, index)`` (:class:`~vlzoo.data.speech.EspeakSynthesizer`, cached on
disk), puts the clip in ``Sample.reference_audio`` and replaces the expression in the prompt by
the reference span ``<ref_start><ref_audio> x k<ref_end>`` ("segment <clip>."); the backbone's
reference encoder turns the clip into the k tokens.  The task and the targets stay the same, so
the same evaluator scores it and the gap to the text prompt is the finding.  Other tasks pass
through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from vlzoo.data.errors import DataError
from vlzoo.data.shapes.dataset import ShapesDataset
from vlzoo.data.speech import EspeakSynthesizer
from vlzoo.structures import Sample, reference_text

__all__ = ["SpokenReferences", "SpokenShapesDataset", "Speaker", "DEFAULT_VOICES", "DEFAULT_SPEEDS"]

#: espeak-ng voices (language + variant): American and British, male and female variants
DEFAULT_VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-us+f2", "en-gb+m3")
#: words per minute
DEFAULT_SPEEDS: tuple[int, ...] = (140, 175, 210)

_SPOKEN_TASKS = ("rec", "res")


class Speaker:
    """Turns a referring sample into a spoken one (the part both datasets below share).

    Args: ``reference_tokens``, ``voices``, ``speeds``, ``cache_dir``, ``seed`` as for
    :class:`SpokenReferences`.
    """

    def __init__(
        self,
        *,
        reference_tokens: int = 4,
        voices: Sequence[str] = DEFAULT_VOICES,
        speeds: Sequence[int] = DEFAULT_SPEEDS,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if not voices or not speeds:
            raise ValueError("spoken references: voices and speeds must not be empty")
        if any(not 80 <= int(s) <= 450 for s in speeds):
            raise ValueError(f"spoken references: speeds are words per minute in [80, 450], got {list(speeds)}")
        self.reference_tokens = int(reference_tokens)
        self.span = reference_text("audio", self.reference_tokens)
        self.voices = tuple(voices)
        self.speeds = tuple(int(s) for s in speeds)
        self.seed = int(seed)
        # espeak-ng from PATH: a recipe chooses voices, speeds and the cache, never an executable
        self.synthesizer = EspeakSynthesizer(cache_dir=cache_dir)

    def voice_of(self, index: int) -> tuple[str, int]:
        """The voice and speed of item ``index`` (deterministic in ``(seed, index)``)."""
        rng = np.random.default_rng([self.seed, 23, int(index)])
        return self.voices[int(rng.integers(len(self.voices)))], self.speeds[int(rng.integers(len(self.speeds)))]

    def __call__(self, sample: Sample | None, index: int) -> Sample | None:
        if sample is None or sample.task not in _SPOKEN_TASKS:
            return sample
        expressions = sample.targets.expressions or []
        if not expressions:
            raise DataError(f"spoken references: item {index} ({sample.task}) has no expression to speak")
        expression = expressions[0]
        if expression not in sample.prompt:
            raise DataError(
                f"spoken references: the prompt {sample.prompt!r} of item {index} ({sample.task}) does not contain "
                f"its expression {expression!r}, so there is nothing to replace by the clip"
            )
        voice, speed = self.voice_of(index)
        clip = self.synthesizer(expression, voice=voice, speed=speed)
        return replace(sample, prompt=sample.prompt.replace(expression, self.span, 1), reference_audio=clip)


class SpokenReferences(Dataset):
    """Any referring dataset with its expressions spoken (see the module doc).

    Args:
        dataset: the referring dataset (e.g. a ``RefCocoDataset`` or ``ShapesDataset``).
        reference_tokens: k, the placeholders per clip; must equal the backbone's
            ``references.tokens`` (a recipe interpolates ``${backbone.references.tokens}``).
        voices: espeak-ng voices to draw from (``espeak-ng --voices``; ``+f2`` ... are variants).
        speeds: speaking rates (words per minute) to draw from.
        cache_dir: the clip cache (default ``$VLZOO_SPEECH_CACHE`` or ``~/.cache/vlzoo/speech``).
        seed: base seed of the voice / speed draws (injected by ``vlzoo.build``).
    """

    def __init__(
        self,
        *,
        dataset: Dataset,
        reference_tokens: int = 4,
        voices: Sequence[str] = DEFAULT_VOICES,
        speeds: Sequence[int] = DEFAULT_SPEEDS,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.speaker = Speaker(
            reference_tokens=reference_tokens, voices=voices, speeds=speeds, cache_dir=cache_dir, seed=seed
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        return self.speaker(self.dataset[index], index)


class SpokenShapesDataset(ShapesDataset):
    """Spoken Shapes: :class:`~vlzoo.data.ShapesDataset` whose rec / res expressions are clips.

    Takes every ``ShapesDataset`` argument plus ``reference_tokens``, ``voices``, ``speeds`` and
    ``cache_dir`` (see :class:`SpokenReferences`).  The scene, the task and the
    targets of item ``i`` are those of ``ShapesDataset`` item ``i``; the voice and speed are
    drawn from ``(seed, i)``.
    """

    def __init__(
        self,
        *,
        reference_tokens: int = 4,
        voices: Sequence[str] = DEFAULT_VOICES,
        speeds: Sequence[int] = DEFAULT_SPEEDS,
        cache_dir: str | None = None,
        split: str = "train",
        size: int = 10000,
        image_size: int = 64,
        tasks: Mapping[str, float] | Sequence[str] = ("rec",),
        rung: Literal["one", "attribute", "spatial", "full"] = "full",
        num_objects: tuple[int, int] | Sequence[int] | None = None,
        occlusion: float = 0.0,
        noise: float = 0.0,
        texture: bool = False,
        twin_prob: float = 0.35,
        compositional: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            split=split,
            size=size,
            image_size=image_size,
            tasks=tasks,
            rung=rung,
            num_objects=num_objects,
            occlusion=occlusion,
            noise=noise,
            texture=texture,
            twin_prob=twin_prob,
            compositional=compositional,
            seed=seed,
        )
        self.speaker = Speaker(
            reference_tokens=reference_tokens,
            voices=voices,
            speeds=speeds,
            cache_dir=cache_dir,
            seed=self.seed,
        )

    def __getitem__(self, index: int) -> Sample:
        return self.speaker(super().__getitem__(index), index)
