"""Text metrics for `finetune evaluate`: exact match, corpus BLEU-4 and ROUGE-L F1, all in [0, 1].

Written out rather than imported (sacrebleu, rouge-score) so evaluation needs no extra dependency;
the formulas are the papers', without smoothing. Scores are not comparable to numbers computed with
another tokeniser: sacrebleu's 13a tokeniser, for one, differs from `tokenize` below.

Tokens (`tokenize`): the casefolded text split into runs of letters/digits, single punctuation marks,
and single CJK characters (Chinese, Japanese and Korean are written without spaces, so a word
tokeniser would see a whole sentence as one token).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def normalise(text: str) -> str:
    """What exact match compares: the text stripped and casefolded."""
    return text.strip().casefold()


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalise`."""
    _check(predictions, references)
    return sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / len(predictions)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU with one reference per prediction (Papineni et al., 2002, ACL, §2):

        BLEU = BP * exp(sum_{n=1..N} (1/N) log p_n),  BP = 1 if c > r else exp(1 - r / c)

    p_n is the modified n-gram precision over the whole corpus: the sum over predictions of each
    n-gram's count clipped to its count in the reference, over the number of prediction n-grams;
    c and r are the total prediction and reference lengths in tokens. No smoothing: a corpus
    without a single matching 4-gram scores 0, as in the paper.
    """
    _check(predictions, references)
    matches, totals = [0] * max_order, [0] * max_order
    hyp_length = ref_length = 0
    for prediction, reference in zip(predictions, references):
        hyp, ref = tokenize(prediction), tokenize(reference)
        hyp_length += len(hyp)
        ref_length += len(ref)
        for n in range(1, max_order + 1):
            hyp_ngrams, ref_ngrams = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(count, ref_ngrams[gram]) for gram, count in hyp_ngrams.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_length == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_order
    brevity = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / hyp_length)
    return brevity * math.exp(log_precision)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence, by the textbook dynamic programme over one row."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence-level ROUGE-L F1 (Lin, 2004, "ROUGE", §3.1, with beta = 1):

        P = LCS / len(prediction),  R = LCS / len(reference),  F = 2PR / (P + R)

    Two empty texts count as a match (1.0); one empty text scores 0.
    """
    _check(predictions, references)
    total = 0.0
    for prediction, reference in zip(predictions, references):
        hyp, ref = tokenize(prediction), tokenize(reference)
        if not hyp or not ref:
            total += float(not hyp and not ref)
            continue
        lcs = _lcs_length(hyp, ref)
        if lcs:
            precision, recall = lcs / len(hyp), lcs / len(ref)
            total += 2 * precision * recall / (precision + recall)
    return total / len(predictions)


METRICS = {"exact": exact_match, "bleu": bleu, "rouge": rouge_l}


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one; got {len(predictions)} "
                         f"and {len(references)}")


__all__ = ["METRICS", "bleu", "exact_match", "normalise", "rouge_l", "tokenize"]
