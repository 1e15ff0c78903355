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
    "sized_tokenizer",
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


def _word_level(vocab: dict[str, int], *, unk_token: str) -> Tokenizer:
    """A word-level ``tokenizers`` core over ``vocab`` that splits as the Shapes tokenizer does:
    lower-cased, words marked with a leading ``▁``, punctuation and digits on their own."""
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk_token))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


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
    tok = _word_level(vocab, unk_token="<unk>")
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


def sized_tokenizer(
    *,
    vocab_size: int,
    tokens: dict[str, int],
    unk_token: str,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    additional_special_tokens: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """A stand-in for a model family's tokenizer, sized to its vocabulary, for dry runs.

    ``tokens`` puts the family's special tokens at their real ids (LLaMA: ``<unk>`` 0, ``<s>``
    1, ``</s>`` 2; LLaVA-hf adds ``<image>`` 32000 and ``<pad>`` 32001).  The other ids hold the
    Shapes word pieces (so Shapes prompts and plain-text coordinates tokenize without
    ``<unk>``), the 256 byte pieces ``<0x00>``..``<0xFF>`` and ``<unused_k>`` fillers up to
    ``vocab_size``.  Token *ids* and the vocabulary size are the family's; how a sentence splits
    into tokens is not (it splits like the Shapes tokenizer), so sequence lengths are close to,
    not equal to, the real tokenizer's.
    """
    vocab: dict[str, int] = dict(tokens)
    taken = set(vocab.values())
    if len(taken) != len(vocab):
        raise ValueError(f"sized_tokenizer: two tokens share an id in {tokens}")
    pieces = [p for p in shapes_tokenizer().get_vocab() if p not in SPECIAL_TOKENS]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    fillers = iter(pieces)
    counter = 0
    for index in range(vocab_size):
        if index in taken:
            continue
        piece = next(fillers, None)
        while piece is not None and piece in vocab:
            piece = next(fillers, None)
        if piece is None:
            piece = f"<unused_{counter}>"
            counter += 1
        vocab[piece] = index
    tok = _word_level(vocab, unk_token=unk_token)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk_token,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=list(additional_special_tokens or []),
        padding_side="right",
        model_max_length=4096,
    )
