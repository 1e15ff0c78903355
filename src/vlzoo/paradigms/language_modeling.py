"""Stage 0: train a multimodal LM on text answers only (captions, VQA; REG with plain boxes).

Every localization paradigm on Shapes starts from a backbone that already "sees": this paradigm
pretrains it on answers that contain no coordinates, as the papers start from LLaVA.  It is also
the yard-stick for *retention*: the same VQA / caption metrics before and after a paradigm's
training tell how much general ability that training cost.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from vlzoo.paradigms.base import BaseParadigm
from vlzoo.structures import Batch, Predictions

__all__ = ["LanguageModeling"]


class LanguageModeling(BaseParadigm):
    """LM cross-entropy on the answer tokens; prediction is greedy generation."""

    name: ClassVar[str] = "language_modeling"
    supported_tasks: ClassVar[tuple[str, ...]] = ("caption", "vqa", "reg")

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        out = self.backbone(
            images=batch.images,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            references=batch.references(),
        )
        return {"lm": out.loss}

    def predict(self, batch: Batch) -> list[Predictions]:
        _, texts = self.generate_text(batch)
        return [
            Predictions(text=text, image_id=batch.image_ids[i], image_size=batch.input_size)
            for i, text in enumerate(texts)
        ]
