"""Paradigms: one LightningModule per way of localizing, on a shared base.

``PARADIGMS`` (in :mod:`vlzoo.paradigms.catalog`) lists them explicitly; the support matrix in
the docs is derived from their ``supported_tasks``.
"""

from __future__ import annotations

from vlzoo.paradigms.attention_keypoints import AttentionKeypoints, AttentionKeypointsAnswer
from vlzoo.paradigms.base import BaseParadigm, to_original, warmup_cosine
from vlzoo.paradigms.catalog import PARADIGMS, list_paradigms, support_matrix
from vlzoo.paradigms.grammar import GrammarConstraint
from vlzoo.paradigms.heatmap import HeatmapMatching, LumenAnswerFormat
from vlzoo.paradigms.language_modeling import LanguageModeling
from vlzoo.paradigms.pixel2emb import EmbeddingAnswerFormat, Pixel2Emb
from vlzoo.paradigms.pixel2seq import Pixel2Seq, Pixel2SeqAnswerFormat

__all__ = [
    "PARADIGMS",
    "AttentionKeypoints",
    "AttentionKeypointsAnswer",
    "BaseParadigm",
    "EmbeddingAnswerFormat",
    "GrammarConstraint",
    "HeatmapMatching",
    "LanguageModeling",
    "LumenAnswerFormat",
    "Pixel2Emb",
    "Pixel2Seq",
    "Pixel2SeqAnswerFormat",
    "list_paradigms",
    "support_matrix",
    "to_original",
    "warmup_cosine",
]
