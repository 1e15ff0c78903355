"""Caption scores, exact match and parse-failure rate."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from evalgen import caption_samples
from torchmetrics.functional.text import bleu_score, rouge_score

from vlzoo.evaluation import CaptionScores, CIDErD, ExactMatch, ParseFailureRate, cider_d, tokenize_caption
from vlzoo.structures import Predictions, Targets


def _coco_caption_cider_d(hyps: list[str], refs: list[list[str]]) -> float:
    """coco-caption's CiderScorer (CIDEr-D, sigma 6, n 4) written out literally on split strings."""

    def precook(s: str, n: int = 4) -> dict:
        words = s.split()
        counts: dict = defaultdict(int)
        for k in range(1, n + 1):
            for i in range(len(words) - k + 1):
                counts[tuple(words[i : i + k])] += 1
        return counts

    crefs = [[precook(r) for r in rs] for rs in refs]
    ctest = [precook(h) for h in hyps]
    document_frequency: dict = defaultdict(float)
    for rs in crefs:
        for ngram in {ng for ref in rs for ng in ref}:
            document_frequency[ngram] += 1
    ref_len = np.log(float(len(crefs)))

    def counts2vec(cnts):
        vec = [defaultdict(float) for _ in range(4)]
        length = 0
        norm = [0.0 for _ in range(4)]
        for ngram, term_freq in cnts.items():
            df = np.log(max(1.0, document_frequency[ngram]))
            n = len(ngram) - 1
            vec[n][ngram] = float(term_freq) * (ref_len - df)
            norm[n] += pow(vec[n][ngram], 2)
            if n == 1:
                length += term_freq
        return vec, [np.sqrt(x) for x in norm], length

    def sim(vec_hyp, vec_ref, norm_hyp, norm_ref, length_hyp, length_ref):
        delta = float(length_hyp - length_ref)
        val = np.array([0.0 for _ in range(4)])
        for n in range(4):
            for ngram, _count in vec_hyp[n].items():
                val[n] += min(vec_hyp[n][ngram], vec_ref[n][ngram]) * vec_ref[n][ngram]
            if (norm_hyp[n] != 0) and (norm_ref[n] != 0):
                val[n] /= norm_hyp[n] * norm_ref[n]
            val[n] *= np.e ** (-(delta**2) / (2 * 6.0**2))
        return val

    scores = []
    for test, rs in zip(ctest, crefs, strict=True):
        vec, norm, length = counts2vec(test)
        score = np.array([0.0 for _ in range(4)])
        for ref in rs:
            vec_ref, norm_ref, length_ref = counts2vec(ref)
            score += sim(vec, vec_ref, norm, norm_ref, length, length_ref)
        scores.append(np.mean(score) / len(rs) * 10.0)
    return float(np.mean(scores))


def test_tokenization() -> None:
    assert tokenize_caption("A man's T-shirt, RED!") == ["a", "man", "s", "t", "shirt", "red"]
    assert tokenize_caption("  ") == []


def test_caption_scores_equal_references() -> None:
    preds, targets = caption_samples(0, 120)
    metric = CaptionScores()
    cider = CIDErD()
    for start in range(0, 120, 16):
        metric.update(preds[start : start + 16], targets[start : start + 16])
        cider.update(preds[start : start + 16], targets[start : start + 16])
    out = metric.compute()
    hyps = [" ".join(tokenize_caption(p.text)) if p.parsed else "" for p in preds]
    refs = [[" ".join(tokenize_caption(r)) for r in t.captions] for t in targets]
    assert float(out["bleu4"]) == pytest.approx(float(bleu_score(hyps, refs, n_gram=4)), abs=1e-6)
    rouge = rouge_score(hyps, refs, rouge_keys="rougeL", accumulate="best")["rougeL_fmeasure"]
    assert float(out["rouge_l"]) == pytest.approx(float(rouge), abs=1e-6)
    ref_cider = _coco_caption_cider_d(hyps, refs)
    assert float(out["cider"]) == pytest.approx(ref_cider, abs=1e-5)
    assert float(cider.compute()) == pytest.approx(ref_cider, abs=1e-5)
    assert 0.1 < float(out["bleu4"]) < 1 and float(out["cider"]) > 0.5


def test_cider_d_of_a_perfect_caption_is_ten() -> None:
    refs = [["a red car parked on a street"], ["two dogs play with a ball"], ["a man reads a green book"]]
    scores = cider_d([r[0].split() for r in refs], [[r[0].split()] for r in refs])
    assert scores == pytest.approx([10.0, 10.0, 10.0])
    assert cider_d([[]], [[["a", "b"]]]) == [0.0]  # one sample: idf is 0 everywhere


def test_caption_unparsed_is_scored_empty_and_missing_reference_raises() -> None:
    metric = CaptionScores()
    assert all(float(v) == 0.0 for v in metric.compute().values())
    metric.update([Predictions(text="a dog", parsed=False)], [Targets(text="a dog")])
    assert float(metric.compute()["bleu4"]) == 0.0 and float(metric.compute()["rouge_l"]) == 0.0
    with pytest.raises(ValueError, match="image_id=77"):
        metric.update([Predictions(text="x")], [Targets(image_id=77)])


def test_exact_match_and_parse_failures() -> None:
    preds = [Predictions(text="Two."), Predictions(text="three"), Predictions(text="blue", parsed=False),
             Predictions(text=None)]
    targets = [Targets(text="two"), Targets(text="four"), Targets(text="blue"), Targets(text="red")]
    em, pf = ExactMatch(), ParseFailureRate()
    em.update(preds, targets)
    pf.update(preds, targets)
    assert float(em.compute()) == pytest.approx(0.25)
    assert float(pf.compute()) == pytest.approx(0.25)
    assert math.isclose(float(ParseFailureRate().compute()), 0.0)
    with pytest.raises(ValueError, match="1 predictions but 2 targets"):
        pf.update([Predictions()], [Targets(), Targets()])
    assert torch.is_tensor(em.compute())
