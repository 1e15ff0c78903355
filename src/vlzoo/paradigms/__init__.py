"""Paradigms: one LightningModule per way of localizing, on a shared base.

Submodules are imported lazily so that ``import vlzoo.paradigms`` stays cheap.
"""

from __future__ import annotations

from vlzoo.paradigms.base import BaseParadigm, to_original, warmup_cosine
from vlzoo.paradigms.language_modeling import LanguageModeling

__all__ = ["BaseParadigm", "LanguageModeling", "to_original", "warmup_cosine"]
from vlzoo.paradigms.attention_keypoints import AttentionKeypoints, AttentionKeypointsAnswer  # noqa: E402

__all__ += ["AttentionKeypoints", "AttentionKeypointsAnswer"]
from vlzoo.paradigms.pixel2emb import EmbeddingAnswerFormat, Pixel2Emb  # noqa: E402

__all__ += ["EmbeddingAnswerFormat", "Pixel2Emb"]
from vlzoo.paradigms.pixel2seq import GrammarConstraint, Pixel2Seq, Pixel2SeqAnswerFormat  # noqa: E402

__all__ += ["GrammarConstraint", "Pixel2Seq", "Pixel2SeqAnswerFormat"]
from vlzoo.paradigms.heatmap import HeatmapMatching, LumenAnswerFormat  # noqa: E402

__all__ += ["HeatmapMatching", "LumenAnswerFormat"]
