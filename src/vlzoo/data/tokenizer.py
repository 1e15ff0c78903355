"""A word-level tokenizer for the Shapes world, for tiny language models trained from scratch.

Every word a Shapes instruction, expression, caption or answer can contain is one token; digits
and punctuation are single tokens, so plain-text coordinates such as ``[0.123,0.456,0.789,0.900]``
tokenize without ``<unk>``.  Text is lower-cased.  Words carry SentencePiece-style ``▁`` markers
(Metaspace) so ``decode`` restores the original spacing.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from vlzoo.data.shapes.language import EXTREMES, NUMBER_WORDS, ORDINALS, RELATIONS, SUPERLATIVES
from vlzoo.data.shapes.world import CATEGORY_NAMES, CATEGORY_PLURALS, COLOUR_NAMES, KEYPOINT_NAMES, SIZE_NAMES
from vlzoo.data.templates import INSTRUCTIONS

__all__ = [
    "SPECIAL_TOKENS",
    "IMAGE_TOKEN",
    "shapes_vocabulary",
    "shapes_tokenizer",
    "save_shapes_tokenizer",
]

IMAGE_TOKEN = "<image>"
#: pad, bos, eos, unk, image placeholder (ids 0..4 in this order)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
_PUNCTUATION = tuple("[](){}<>,.;:?!'\"-_/+=*%#&|")
# words the Shapes language writes outside the tables it imports (see shapes/language.py),
# the default prompt template's roles and a few words answer formats commonly use
_EXTRA_WORDS = """
the a an that is are there from to of in on at and or with what which where how many kind
colour color shape shapes half yes no only one object objects region image none box boxes mask
masks point points keypoint keypoints visible occluded pose user assistant answer question
""".split()
_WORD = re.compile(r"[a-z]+")


def shapes_vocabulary() -> list[str]:
    """Every word of the Shapes language (sorted), without special tokens, digits or punctuation."""
    words: set[str] = set(_EXTRA_WORDS)
    tables = [
        CATEGORY_NAMES,
        tuple(CATEGORY_PLURALS.values()),
        COLOUR_NAMES,
        SIZE_NAMES,
        KEYPOINT_NAMES,
        NUMBER_WORDS,
        ORDINALS,
        tuple(EXTREMES.values()),
        tuple(EXTREMES),
    ]
    for table in tables:
        words.update(table)
    for phrasings in (*RELATIONS.values(), *SUPERLATIVES.values(), *INSTRUCTIONS.values()):
        for text in phrasings:
            words.update(_WORD.findall(text.replace("{box}", "").replace("{expr}", "")))
    words -= {"category", "plural"}  # template field names, not words
    return sorted(words)


def shapes_tokenizer() -> PreTrainedTokenizerFast:
    """The Shapes word-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Special tokens: ``<pad>`` (0), ``<s>`` bos (1), ``</s>`` eos (2), ``<unk>`` (3),
    ``<image>`` (4, also registered as an additional special token).
    """
    symbols = [str(d) for d in range(10)] + list(_PUNCTUATION)
    pieces = list(SPECIAL_TOKENS) + ["▁"]
    for w in shapes_vocabulary() + symbols:
        pieces += [w, "▁" + w]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN],
        padding_side="right",
        model_max_length=512,
    )
    return fast


def save_shapes_tokenizer(directory: str | Path) -> Path:
    """Write the Shapes tokenizer as a folder ``AutoTokenizer.from_pretrained`` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes_tokenizer().save_pretrained(str(directory))
    return directory
