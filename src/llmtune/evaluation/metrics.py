"""Pure evaluation metrics for classification and free-text generation.

Every function here takes plain lists of strings and returns plain Python
numbers / dicts (JSON-serialisable), so the results can be written straight
into run reports.  No model, device, file or network access happens here:
the heavy lifting is delegated to scikit-learn, sacrebleu and rouge-score,
which are imported as libraries (never via ``evaluate.load``, which downloads
metric scripts at runtime).
"""

from __future__ import annotations

import re

import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

__all__ = [
    "classification_metrics",
    "bleu",
    "rouge",
    "ngram_similarity",
    "text_generation_metrics",
]

_WORD_RE = re.compile(r"\w+")
# Chinese, Japanese and Korean scripts write no spaces between words: their text is compared character by character
# (the usual choice for ROUGE and BLEU on those languages when no word segmenter is installed).
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\uac00-\ud7af]")


def has_cjk(texts: list[str]) -> bool:
    return any(_CJK_RE.search(text) for text in texts)


class _CjkAwareTokenizer:
    """rouge-score's tokenizer (lower-cased words, Porter stems) with each CJK character a token of its own."""

    def __init__(self):
        from rouge_score.tokenizers import DefaultTokenizer

        self.words = DefaultTokenizer(use_stemmer=True)

    def tokenize(self, text: str) -> list[str]:
        if not _CJK_RE.search(text):
            return self.words.tokenize(text)
        tokens = []
        for piece in _CJK_RE.sub(lambda match: f" {match.group()} ", text).split():
            tokens += [piece] if _CJK_RE.fullmatch(piece) else self.words.tokenize(piece)
        return tokens


def _check_pairs(predictions: list[str], references: list[str]) -> None:
    """Reject inputs that would silently produce meaningless scores."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, "
            f"got {len(predictions)} predictions and {len(references)} references"
        )
    if not predictions:
        raise ValueError("predictions and references must not be empty")


def classification_metrics(predictions: list[str], references: list[str], labels: list[str]) -> dict:
    """Accuracy, macro P/R/F1, per-label scores and a confusion matrix.

    Averages are taken over ``labels`` (not over whatever strings happen to
    occur), so a model that emits junk outside the label set is scored as
    wrong rather than inventing extra classes.
    """
    _check_pairs(predictions, references)
    labels = list(labels)
    if not labels:
        raise ValueError("labels must not be empty")
    unknown = sorted({r for r in references} - set(labels))
    if unknown:
        raise ValueError(f"references contain labels not in the label set {labels}: {unknown}")

    # accuracy_score compares strings directly, so out-of-label predictions
    # simply count as wrong.
    accuracy = float(accuracy_score(references, predictions))
    macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(
        references, predictions, labels=labels, average="macro", zero_division=0
    )
    # Weighted by each label's support: on imbalanced data it follows accuracy, where macro treats a rare class as
    # much as a common one; both are reported.
    _, _, weighted_f1, _ = precision_recall_fscore_support(
        references, predictions, labels=labels, average="weighted", zero_division=0
    )
    prec, rec, f1, support = precision_recall_fscore_support(
        references, predictions, labels=labels, average=None, zero_division=0
    )
    # Rows = gold, columns = predicted; predictions outside `labels` fall in no
    # column, so a row can sum to less than that label's support.
    matrix = confusion_matrix(references, predictions, labels=labels)

    per_label = {
        label: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            # Per-label accuracy (share of this label's gold items predicted
            # correctly) is mathematically identical to recall; both keys are
            # kept because reports/readers ask for "accuracy per label" by name.
            "accuracy": float(rec[i]),
        }
        for i, label in enumerate(labels)
    }
    return {
        "accuracy": accuracy,
        "n": len(references),
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
        "macro_f1": float(macro_f1),
        "weighted_f1": float(weighted_f1),
        "per_label": per_label,
        "confusion_matrix": {"labels": labels, "matrix": [[int(x) for x in row] for row in matrix]},
    }


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing; character tokens for CJK text), 0-100."""
    _check_pairs(predictions, references)
    tokenize = "char" if has_cjk(references) else "13a"
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score)


def rouge(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F-measures (0-1) over prediction/reference pairs."""
    return {key: sum(scores) / len(scores) for key, scores in rouge_per_row(predictions, references).items()}


def rouge_per_row(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measure of each prediction/reference pair."""
    _check_pairs(predictions, references)
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), tokenizer=_CjkAwareTokenizer())
    # rouge-score's signature is score(target, prediction).
    pairs = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {key: [scores[key].fmeasure for scores in pairs] for key in keys}


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = _WORD_RE.findall(_CJK_RE.sub(lambda match: f" {match.group()} ", text.lower()))
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def ngram_similarity(predictions: list[str], references: list[str], n: int = 2) -> float:
    """Mean Jaccard similarity between the word n-gram sets of each pair (ngram_similarity_per_row)."""
    scores = ngram_similarity_per_row(predictions, references, n)
    return sum(scores) / len(scores)


def ngram_similarity_per_row(predictions: list[str], references: list[str], n: int = 2) -> list[float]:
    """Jaccard similarity between the word n-gram sets of each pair.

    For one pair with n-gram sets P (prediction) and R (reference):
        J(P, R) = |P ∩ R| / |P ∪ R|
    with J = 1.0 when both sets are empty (two equally "empty" texts agree)
    and J = 0.0 when exactly one is empty.  Tokens are lowercased ``\\w+``
    matches (each CJK character a token), so punctuation and whitespace
    differences are ignored.
    """
    _check_pairs(predictions, references)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    scores = []
    for pred, ref in zip(predictions, references):
        p, r = _ngrams(pred, n), _ngrams(ref, n)
        union = p | r
        scores.append(len(p & r) / len(union) if union else 1.0)
    return scores


def text_generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """BLEU, ROUGE-1/2/L, bigram Jaccard similarity and the number of pairs."""
    _check_pairs(predictions, references)
    return {
        "bleu": bleu(predictions, references),
        **rouge(predictions, references),
        "ngram_similarity": ngram_similarity(predictions, references, n=2),
        "n": len(predictions),
    }
