"""Grammar-constrained decoding over a coordinate codec's answer grammars.

:class:`GrammarConstraint` is a transformers ``LogitsProcessor`` that lets through only the
tokens keeping each row's answer a prefix of its grammar (the regular grammars a
:class:`~vlzoo.paradigms.codecs.CoordinateCodec` writes over its normalised text).  It lives next
to the codecs because it speaks their normalised text and nothing else: any paradigm that
generates coordinate text can use it (pixel2seq does; ``vlzoo.paradigms.pixel2seq`` re-exports
it under its old name).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import regex
import torch
from torch import Tensor
from transformers import LogitsProcessor

from vlzoo.paradigms.codecs import CoordinateCodec

__all__ = ["GrammarConstraint"]


class GrammarConstraint(LogitsProcessor):
    """Let through only tokens that keep each row's answer a prefix of its grammar.

    The answer so far is normalised as the codec's grammars expect (whitespace dropped, the
    codec's special tokens replaced by their symbols); a candidate token is allowed when
    ``grammar.fullmatch(answer + token, partial=True)`` succeeds, eos only when the answer
    already matches in full.  A whitespace-only token is allowed once between two others (the
    datamodule starts every answer with a word boundary).  Masks are cached per
    ``(grammar, answer)``, so token codecs - whose normalised answers are a handful of strings -
    pay the regex cost once.  Rows whose grammar is ``None`` are not constrained.

    It also records the probability of every chosen token (after the constraint);
    :meth:`token_probabilities` returns them for the ids ``generate`` produced.

    Args:
        tokenizer: the backbone's tokenizer.
        codec: the codec whose special tokens the grammars name.
        grammars: one regex (or ``None``) per row.
        prompt_length: width of the (left-padded) prompt: ids beyond it are generated.
        cache_size: most ``(grammar, answer)`` masks kept.
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        codec: CoordinateCodec,
        grammars: Sequence[str | None],
        prompt_length: int,
        cache_size: int = 4096,
    ) -> None:
        self.grammars = [regex.compile(g) if g is not None else None for g in grammars]
        self.prompt_length = int(prompt_length)
        self.eos_id = tokenizer.eos_token_id
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[int, str], Tensor] = OrderedDict()
        self.vocab_size = len(tokenizer)
        self.strings, self.space_ids = _normalised_vocabulary(tokenizer, codec)
        by_string: dict[str, list[int]] = {}
        for i, s in enumerate(self.strings):
            if s:
                by_string.setdefault(s, []).append(i)
        self._candidates = [(s, torch.tensor(ids, dtype=torch.long)) for s, ids in by_string.items()]
        self._by_first: dict[str, list[int]] = {}
        for index, (s, _) in enumerate(self._candidates):
            self._by_first.setdefault(s[0], []).append(index)
        self._steps: dict[tuple[int, str], list[int]] = {}
        self._space = torch.tensor(sorted(self.space_ids), dtype=torch.long)
        self._probs: list[Tensor] = []
        self._last: Tensor | None = None

    def _extensions(self, grammar: Any, text: str) -> list[int]:
        """Indices of the candidate strings that keep ``text`` a grammar prefix (one step)."""
        key = (id(grammar), text)
        found = self._steps.get(key)
        if found is None:
            found = []
            for first, group in self._by_first.items():
                if grammar.fullmatch(text + first, partial=True) is None:
                    continue
                for index in group:
                    if grammar.fullmatch(text + self._candidates[index][0], partial=True) is not None:
                        found.append(index)
            self._steps[key] = found
            if len(self._steps) > self.cache_size:
                self._steps.pop(next(iter(self._steps)))
        return found

    def _allowed(self, row: int, text: str, after_space: bool) -> Tensor:
        grammar = self.grammars[row]
        key = (id(grammar), text)
        mask = self._cache.get(key)
        if mask is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            for index in self._extensions(grammar, text):
                s, ids = self._candidates[index]
                # one step of look-ahead: a token is taken only if the answer can go on or end
                # after it ("no" is a prefix of "none" but no token completes it)
                child = text + s
                if grammar.fullmatch(child) is not None or self._extensions(grammar, child):
                    mask[ids] = True
            if mask.any() and self._space.numel():
                mask[self._space] = True
            if self.eos_id is not None and grammar.fullmatch(text) is not None:
                mask[self.eos_id] = True
            self._cache[key] = mask
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if after_space and self._space.numel():
            mask = mask.clone()
            mask[self._space] = False
        return mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            chosen = input_ids[:, -1].to(self._last.device)
            self._probs.append(self._last.gather(1, chosen[:, None])[:, 0].cpu())
        generated = input_ids[:, self.prompt_length :].tolist()
        vocab = scores.shape[-1]
        keep = torch.ones(scores.shape, dtype=torch.bool)
        for row, ids in enumerate(generated):
            if self.grammars[row] is None or (self.eos_id is not None and self.eos_id in ids):
                continue
            text = "".join(self.strings[i] for i in ids if i < len(self.strings))
            after_space = bool(ids) and ids[-1] in self.space_ids
            allowed = self._allowed(row, text, after_space)
            if not allowed.any():
                # a dead end (the look-ahead is one token deep): end the answer, which then fails
                # to parse and is counted, rather than let the row say anything
                allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
                if self.eos_id is not None:
                    allowed[self.eos_id] = True
            row_mask = torch.zeros(vocab, dtype=torch.bool)
            n = min(vocab, allowed.numel())
            row_mask[:n] = allowed[:n]
            keep[row] = row_mask
        out = scores.masked_fill(~keep.to(scores.device), float("-inf"))
        self._last = out.float().softmax(-1)
        return out

    def token_probabilities(self, new_ids: Tensor) -> Tensor:
        """``(B, T)`` probability of each generated token (1.0 where none was recorded)."""
        probs = torch.ones(new_ids.shape, dtype=torch.float32)
        recorded = list(self._probs)
        if self._last is not None and len(recorded) < new_ids.shape[1]:
            last = new_ids[:, len(recorded)].to(self._last.device)
            recorded.append(self._last.gather(1, last[:, None])[:, 0].cpu())
        for t, p in enumerate(recorded[: new_ids.shape[1]]):
            probs[:, t] = p
        return probs


def _normalised_vocabulary(tokenizer: Any, codec: CoordinateCodec) -> tuple[list[str], set[int]]:
    """Normalised string of every token id ('' for tokens never allowed) and the whitespace ids."""
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    strings: list[str] = []
    spaces: set[int] = set()
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    for i, tok in enumerate(tokens):
        if tok is None:
            strings.append("")
            continue
        sym = codec.normalise_token(tok)
        if sym is not None:
            strings.append(sym)
            continue
        if i in special:
            strings.append("")
            continue
        text = tokenizer.convert_tokens_to_string([tok])
        if text.strip() == "" and (text != "" or tok.strip("▁Ġ ") == ""):
            spaces.add(i)
            strings.append("")
            continue
        strings.append("".join(text.split()))
    return strings, spaces
