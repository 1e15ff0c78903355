"""Text metrics: caption scores (BLEU-4, ROUGE-L, CIDEr-D), exact match and parse-failure rate.

Tokenization (the same for BLEU-4, ROUGE-L and CIDEr-D, see :func:`tokenize_caption`): lower-case,
then every maximal run of letters / digits is a token; everything else (spaces, punctuation,
apostrophes, hyphens) separates tokens and is dropped.  This approximates coco-caption's
PTBTokenizer followed by its punctuation removal; it differs on contractions ("don't" -> "don t"
here, "do n't" there) and hyphenated words ("t-shirt" -> "t shirt").
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.text import bleu_score, rouge_score

from vlzoo.evaluation.common import ObjectListSync, check_pairs
from vlzoo.structures import Predictions, Targets

__all__ = [
    "tokenize_caption",
    "normalize_answer",
    "reference_texts",
    "cider_d",
    "CIDErD",
    "CaptionScores",
    "ExactMatch",
    "ParseFailureRate",
]

_TOKEN = re.compile(r"[^\W_]+")


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased runs of letters and digits (punctuation dropped)."""
    return _TOKEN.findall(text.lower())


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: lower-case, collapse whitespace, strip surrounding whitespace and
    trailing ``.``."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def reference_texts(target: Targets) -> list[str]:
    """The reference texts of a sample: ``captions`` if any, else ``text``, else ``expressions``.

    Raises ``ValueError`` naming the ``image_id`` when the sample has none.
    """
    if target.captions:
        return list(target.captions)
    if target.text is not None:
        return [target.text]
    if target.expressions:
        return list(target.expressions)
    raise ValueError(f"the target of image_id={target.image_id} has no reference text (captions, text or expressions)")


def _hypothesis(pred: Predictions) -> str:
    """Generated text, or ``""`` (a miss) when it did not parse or is missing."""
    return pred.text if pred.parsed and pred.text is not None else ""


def _encode(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _decode(data: Tensor) -> str:
    return bytes(data.tolist()).decode("utf-8")


# ----------------------------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------------------------
def _ngrams(tokens: list[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def cider_d(
    hypotheses: Sequence[list[str]],
    references: Sequence[Sequence[list[str]]],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> list[float]:
    """Per-sample CIDEr-D (Vedantam et al., CVPR 2015) of tokenized hypotheses against tokenized
    references, following coco-caption's ``cider_scorer.py``:

    * TF-IDF n-gram vectors (n = 1..4); document frequency = number of samples whose reference set
      contains the n-gram, over the whole corpus given; idf = log(#samples) - log(max(1, df));
    * per n: the hypothesis vector clipped to the reference counts (``min(h, r) * r``) over the
      product of norms, times a Gaussian length penalty ``exp(-(l_h - l_r)^2 / (2 sigma^2))``
      (coco-caption measures the lengths in bigrams - kept for comparability);
    * mean over n and references, times 10.

    The corpus score is the mean of the returned list.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"cider_d got {len(hypotheses)} hypotheses but {len(references)} reference sets")
    crefs = [[_ngrams(r, n) for r in refs] for refs in references]
    ctest = [_ngrams(h, n) for h in hypotheses]
    df: defaultdict[tuple[str, ...], float] = defaultdict(float)
    for refs in crefs:
        for ngram in {g for ref in refs for g in ref}:
            df[ngram] += 1
    ref_len = math.log(float(len(crefs))) if crefs else 0.0

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            v[k][ngram] = float(tf) * (ref_len - math.log(max(1.0, df[ngram])))
            norm[k] += v[k][ngram] ** 2
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for test, refs in zip(ctest, crefs, strict=True):
        v_h, n_h, l_h = vec(test)
        total = [0.0] * n
        for ref in refs:
            v_r, n_r, l_r = vec(ref)
            delta = float(l_h - l_r)
            for k in range(n):
                val = sum(min(x, v_r[k].get(g, 0.0)) * v_r[k].get(g, 0.0) for g, x in v_h[k].items())
                if n_h[k] != 0 and n_r[k] != 0:
                    val /= n_h[k] * n_r[k]
                total[k] += val * math.exp(-(delta**2) / (2 * sigma**2))
        scores.append(sum(total) / n / max(len(refs), 1) * 10.0)
    return scores


class _TextCorpus(ObjectListSync, Metric):
    """Stores each sample's hypothesis and references as UTF-8 byte tensors (so distributed ranks can
    gather them) for corpus-level scores computed in ``compute``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("hypotheses", default=[], dist_reduce_fx="cat")
        self.add_state("references", default=[], dist_reduce_fx="cat")

    def update(self, preds: list[Predictions], targets: list[Targets]) -> None:
        """Accumulate generated texts and their references (unparsed predictions score as ``""``)."""
        check_pairs(preds, targets, metric=type(self).__name__)
        for pred, target in zip(preds, targets, strict=True):
            refs = [" ".join(r.split()) for r in reference_texts(target)]
            self.hypotheses.append(_encode(_hypothesis(pred)))
            self.references.append(_encode("\n".join(refs)))

    def _corpus(self) -> tuple[list[list[str]], list[list[list[str]]]]:
        hyps = [tokenize_caption(_decode(h)) for h in self.hypotheses]
        refs = [[tokenize_caption(r) for r in _decode(x).split("\n")] for x in self.references]
        return hyps, refs


class CIDErD(_TextCorpus):
    """Corpus CIDEr-D (see :func:`cider_d`); document frequencies come from this split's references.
    0 with no samples."""

    def compute(self) -> Tensor:
        """Mean per-sample CIDEr-D."""
        hyps, refs = self._corpus()
        scores = cider_d(hyps, refs)
        return torch.tensor(sum(scores) / len(scores) if scores else 0.0, dtype=torch.float32)


class CaptionScores(_TextCorpus):
    """Region-caption / caption scores: ``bleu4`` (corpus BLEU-4, torchmetrics ``bleu_score``, no
    smoothing), ``rouge_l`` (mean ROUGE-L F-measure, torchmetrics ``rouge_score``, best reference per
    sample) and ``cider`` (CIDEr-D).  All three see the same tokenization
    (:func:`tokenize_caption`, tokens re-joined by single spaces).  0 with no samples."""

    def compute(self) -> dict[str, Tensor]:
        """``bleu4``, ``rouge_l``, ``cider`` as float32 scalars."""
        hyps, refs = self._corpus()
        if not hyps:
            zero = torch.tensor(0.0)
            return {"bleu4": zero, "rouge_l": zero.clone(), "cider": zero.clone()}
        hyp_text = [" ".join(h) for h in hyps]
        ref_text = [[" ".join(r) for r in rs] for rs in refs]
        bleu = bleu_score(hyp_text, ref_text, n_gram=4)
        rouge = rouge_score(hyp_text, ref_text, rouge_keys="rougeL", accumulate="best")["rougeL_fmeasure"]
        cider = cider_d(hyps, refs)
        return {
            "bleu4": bleu.float().reshape(()),
            "rouge_l": rouge.float().reshape(()),
            "cider": torch.tensor(sum(cider) / len(cider), dtype=torch.float32),
        }


class ExactMatch(Metric):
    """Fraction of samples whose generated text equals a reference after :func:`normalize_answer`
    (references: ``text``, else ``captions``, else ``expressions``).  An unparsed prediction is a
    miss.  0 with no samples."""

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("hits", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: list[Predictions], targets: list[Targets]) -> None:
        """Accumulate one batch of samples."""
        check_pairs(preds, targets, metric="ExactMatch")
        for pred, target in zip(preds, targets, strict=True):
            refs = [target.text] if target.text is not None else reference_texts(target)
            answer = normalize_answer(_hypothesis(pred))
            hit = pred.parsed and pred.text is not None and any(answer == normalize_answer(r) for r in refs)
            self.hits += float(hit)
            self.count += 1

    def compute(self) -> Tensor:
        """The exact-match rate."""
        return (self.hits / self.count.clamp(min=1)).float()


class ParseFailureRate(Metric):
    """Fraction of samples whose prediction has ``parsed=False`` (such predictions are also scored as
    misses by the task metrics, never dropped).  0 with no samples."""

    full_state_update = False
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("failures", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: list[Predictions], targets: list[Targets]) -> None:
        """Count the samples and the unparsed predictions among them."""
        check_pairs(preds, targets, metric="ParseFailureRate")
        self.failures += float(sum(not p.parsed for p in preds))
        self.count += len(preds)

    def compute(self) -> Tensor:
        """The parse-failure rate."""
        return (self.failures / self.count.clamp(min=1)).float()
