"""Tests for llmtune.evaluation.metrics against values worked out by hand."""

from __future__ import annotations

import json
import math

import pytest

from llmtune.evaluation.metrics import (
    bleu,
    classification_metrics,
    ngram_similarity,
    rouge,
    text_generation_metrics,
)

# --------------------------------------------------------------------------
# classification_metrics
# --------------------------------------------------------------------------

LABELS = ["a", "b", "c"]
#            idx:  0    1    2    3    4    5
GOLD = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "b", "b", "b", "c", "c"]
# Correct at idx 0, 3, 5 -> accuracy = 3/6 = 0.5
#
# label a: predicted a at {0}          -> TP=1 (0), FP=0
#          gold a at {0,1,2}           -> FN=2 (1->b, 2->b)
#          P = 1/1 = 1, R = 1/3, F1 = 2*1*(1/3)/(1+1/3) = (2/3)/(4/3) = 1/2
# label b: predicted b at {1,2,3}      -> TP=1 (3), FP=2 (1,2 are gold a)
#          gold b at {3,4}             -> FN=1 (4->c)
#          P = 1/3, R = 1/2, F1 = 2*(1/6)/(5/6) = 2/5
# label c: predicted c at {4,5}        -> TP=1 (5), FP=1 (4 is gold b)
#          gold c at {5}               -> FN=0
#          P = 1/2, R = 1, F1 = 2*(1/2)/(3/2) = 2/3
# macro P  = (1 + 1/3 + 1/2)/3 = (11/6)/3 = 11/18
# macro R  = (1/3 + 1/2 + 1)/3 = 11/18
# macro F1 = (1/2 + 2/5 + 2/3)/3 = (15/30 + 12/30 + 20/30)/3 = 47/90
# confusion matrix (rows gold, cols pred, order a,b,c):
#   gold a: pred a x1 (0), pred b x2 (1,2), pred c x0 -> [1, 2, 0]
#   gold b: pred b x1 (3), pred c x1 (4)             -> [0, 1, 1]
#   gold c: pred c x1 (5)                            -> [0, 0, 1]


def test_classification_metrics_hand_computed() -> None:
    m = classification_metrics(PRED, GOLD, LABELS)

    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["macro_precision"] == pytest.approx(11 / 18)
    assert m["macro_recall"] == pytest.approx(11 / 18)
    assert m["macro_f1"] == pytest.approx(47 / 90)

    expected = {
        "a": (1.0, 1 / 3, 1 / 2, 3),
        "b": (1 / 3, 1 / 2, 2 / 5, 2),
        "c": (1 / 2, 1.0, 2 / 3, 1),
    }
    assert set(m["per_label"]) == set(LABELS)
    for label, (p, r, f, support) in expected.items():
        row = m["per_label"][label]
        assert row["precision"] == pytest.approx(p), label
        assert row["recall"] == pytest.approx(r), label
        assert row["f1"] == pytest.approx(f), label
        assert row["support"] == support, label
        # per-label accuracy = share of gold items of this label predicted correctly = recall
        assert row["accuracy"] == pytest.approx(r), label

    assert m["confusion_matrix"] == {
        "labels": ["a", "b", "c"],
        "matrix": [[1, 2, 0], [0, 1, 1], [0, 0, 1]],
    }


def test_classification_metrics_is_plain_json() -> None:
    m = classification_metrics(PRED, GOLD, LABELS)
    # Round-trips through JSON unchanged (no numpy scalars / arrays left).
    assert json.loads(json.dumps(m)) == m
    assert all(type(x) is int for row in m["confusion_matrix"]["matrix"] for x in row)
    assert type(m["per_label"]["a"]["support"]) is int
    assert type(m["accuracy"]) is float


def test_predictions_outside_label_set_count_as_wrong() -> None:
    labels = ["pos", "neg"]
    gold = ["pos", "neg", "pos"]
    pred = ["pos", "maybe", "neutral"]  # last two are not valid labels
    m = classification_metrics(pred, gold, labels)
    # Only idx 0 is correct -> accuracy 1/3.
    assert m["accuracy"] == pytest.approx(1 / 3)
    # pos: TP=1, FP=0, FN=1 (idx 2 -> "neutral") -> P=1, R=1/2, F1=2/3
    assert m["per_label"]["pos"]["precision"] == pytest.approx(1.0)
    assert m["per_label"]["pos"]["recall"] == pytest.approx(0.5)
    assert m["per_label"]["pos"]["f1"] == pytest.approx(2 / 3)
    # neg: TP=0, FP=0 (never predicted -> P=0 by zero_division=0), FN=1 -> R=0, F1=0
    assert m["per_label"]["neg"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "accuracy": 0.0,
    }
    # macro over the 2 given labels only (no extra "maybe"/"neutral" classes):
    assert m["macro_precision"] == pytest.approx((1 + 0) / 2)
    assert m["macro_recall"] == pytest.approx((0.5 + 0) / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    # Out-of-label predictions land in no column, so rows sum to less than support.
    assert m["confusion_matrix"]["matrix"] == [[1, 0], [0, 0]]


def test_classification_metrics_perfect() -> None:
    m = classification_metrics(["x", "y"], ["x", "y"], ["x", "y", "z"])
    assert m["accuracy"] == 1.0
    # "z" has no support and is never predicted -> all zeros, and it pulls the
    # macro average down to (1 + 1 + 0)/3 because averages are over `labels`.
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"]["matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    ("pred", "gold", "labels", "match"),
    [
        (["a"], ["a", "b"], ["a", "b"], "same length"),
        ([], [], ["a", "b"], "empty"),
        (["a", "b"], ["a", "zzz"], ["a", "b"], "zzz"),
    ],
)
def test_classification_metrics_errors(pred, gold, labels, match) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(pred, gold, labels)


# --------------------------------------------------------------------------
# BLEU
# --------------------------------------------------------------------------


def test_bleu_identical_is_100() -> None:
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


def test_bleu_no_overlap_is_0() -> None:
    # No matching unigram -> sacrebleu returns 0 before any smoothing applies.
    assert bleu(["foo bar baz qux"], ["alpha beta gamma delta"]) == 0.0


def test_bleu_hand_computed() -> None:
    # hyp: the cat sat on the mat today      (c = 7 tokens)
    # ref: the cat sat on the red mat today  (r = 8 tokens)
    # p1: all 7 hyp unigrams occur in ref (the x2 clipped to 2)         = 7/7 = 1
    # p2: the-cat, cat-sat, sat-on, on-the, mat-today match; the-mat not = 5/6
    # p3: the-cat-sat, cat-sat-on, sat-on-the match;
    #     on-the-mat, the-mat-today do not                              = 3/5
    # p4: the-cat-sat-on, cat-sat-on-the match;
    #     sat-on-the-mat, on-the-mat-today do not                       = 2/4
    # All precisions are nonzero, so sacrebleu's default 'exp' smoothing
    # (which only touches zero counts) has no effect.
    # geometric mean = (1 * 5/6 * 3/5 * 1/2) ** (1/4) = (1/4) ** (1/4) = 1/sqrt(2)
    # BP = exp(1 - r/c) = exp(1 - 8/7) = exp(-1/7)      (c < r)
    # BLEU = 100 * exp(-1/7) / sqrt(2) ~= 61.2975
    expected = 100 * math.exp(-1 / 7) / math.sqrt(2)
    got = bleu(["the cat sat on the mat today"], ["the cat sat on the red mat today"])
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(61.2975, abs=1e-3)


def test_bleu_length_mismatch() -> None:
    with pytest.raises(ValueError, match="same length"):
        bleu(["a b c d"], [])


# --------------------------------------------------------------------------
# ROUGE
# --------------------------------------------------------------------------


def test_rouge1_hand_computed() -> None:
    # pred unigrams: the, cat, sat (3); ref: the, cat, sat, down (4); overlap 3
    # P = 3/3 = 1, R = 3/4, F = 2*1*0.75/(1.75) = 1.5/1.75 = 6/7
    r = rouge(["the cat sat"], ["the cat sat down"])
    assert r["rouge1"] == pytest.approx(6 / 7)
    # bigrams: pred {the cat, cat sat} (2), ref {the cat, cat sat, sat down} (3)
    # overlap 2 -> P = 1, R = 2/3, F = 2*(2/3)/(5/3) = 4/5
    assert r["rouge2"] == pytest.approx(4 / 5)
    # LCS = "the cat sat" = 3 -> same P/R as ROUGE-1 -> 6/7
    assert r["rougeL"] == pytest.approx(6 / 7)


def test_rouge2_hand_computed() -> None:
    # pred: the cat sat on the mat   ref: the cat lay on the mat
    # pred bigrams: the-cat, cat-sat, sat-on, on-the, the-mat   (5)
    # ref  bigrams: the-cat, cat-lay, lay-on, on-the, the-mat   (5)
    # overlap: the-cat, on-the, the-mat = 3 -> P = R = F = 3/5
    # (ROUGE-1: overlap the x2, cat, on, mat = 5 of 6 each -> P = R = F = 5/6)
    r = rouge(["the cat sat on the mat"], ["the cat lay on the mat"])
    assert r["rouge2"] == pytest.approx(3 / 5)
    assert r["rouge1"] == pytest.approx(5 / 6)


def test_rougeL_hand_computed() -> None:
    # pred: the gunman was killed by police   (6 tokens)
    # ref : police killed the gunman          (4 tokens)
    # (the stemmer maps both "killed" to "kill", so they match)
    # ROUGE-1: overlap police, killed, the, gunman = 4
    #          P = 4/6, R = 4/4, F = 2*(2/3)/(5/3) = 4/5
    # ROUGE-L: longest common subsequence in order:
    #   "the gunman" (2). "police" is first in ref but last in pred, and after
    #   "killed" ref has "the gunman" while pred has "by police" -> LCS = 2
    #          P = 2/6, R = 2/4, F = 2*(1/3)(1/2)/(1/3+1/2) = (1/3)/(5/6) = 2/5
    r = rouge(["the gunman was killed by police"], ["police killed the gunman"])
    assert r["rouge1"] == pytest.approx(4 / 5)
    assert r["rougeL"] == pytest.approx(2 / 5)


def test_rouge_is_mean_over_pairs() -> None:
    # pair 1 identical -> 1.0 for all; pair 2 (above) rouge1 = 6/7
    r = rouge(["x y z", "the cat sat"], ["x y z", "the cat sat down"])
    assert r["rouge1"] == pytest.approx((1 + 6 / 7) / 2)


# --------------------------------------------------------------------------
# n-gram (Jaccard) similarity
# --------------------------------------------------------------------------


def test_ngram_similarity_hand_computed() -> None:
    preds = ["The cat sat on the mat.", "Hi!", "hello world"]
    refs = ["the cat sat on a mat", "hello", "hi"]
    # pair 1 (lowercased, punctuation dropped):
    #   P = {the cat, cat sat, sat on, on the, the mat}
    #   R = {the cat, cat sat, sat on, on a, a mat}
    #   |P & R| = 3, |P | R| = 7 -> 3/7
    # pair 2: one word each -> both bigram sets empty -> 1.0
    # pair 3: {hello world} vs {} -> one empty -> 0.0
    # mean = (3/7 + 1 + 0) / 3 = (10/7)/3 = 10/21
    assert ngram_similarity(preds, refs) == pytest.approx(10 / 21)


def test_ngram_similarity_unigrams_use_sets() -> None:
    # n=1: {the, cat} vs {cat, dog}: the duplicate "the" counts once
    # intersection {cat} = 1, union {the, cat, dog} = 3 -> 1/3
    assert ngram_similarity(["the the cat"], ["cat dog"], n=1) == pytest.approx(1 / 3)


def test_ngram_similarity_errors() -> None:
    with pytest.raises(ValueError, match="same length"):
        ngram_similarity(["a b"], ["a b", "c d"])
    with pytest.raises(ValueError, match="empty"):
        ngram_similarity([], [])


# --------------------------------------------------------------------------
# combined
# --------------------------------------------------------------------------


def test_text_generation_metrics_combines_components() -> None:
    preds = ["the cat sat on the mat today", "the cat sat"]
    refs = ["the cat sat on the red mat today", "the cat sat down"]
    m = text_generation_metrics(preds, refs)
    assert set(m) == {"bleu", "rouge1", "rouge2", "rougeL", "ngram_similarity", "n"}
    assert m["n"] == 2
    assert m["bleu"] == pytest.approx(bleu(preds, refs))
    r = rouge(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert m[key] == pytest.approx(r[key])
    # bigram Jaccard: pair 1 P has 6 bigrams, R has 7, overlap 5 (see BLEU test)
    #   -> 5 / (6 + 7 - 5) = 5/8; pair 2: {the cat, cat sat} vs
    #   {the cat, cat sat, sat down} -> 2/3; mean = (5/8 + 2/3)/2 = 31/48
    assert m["ngram_similarity"] == pytest.approx(31 / 48)
    assert json.loads(json.dumps(m)) == m


def test_text_generation_metrics_identical() -> None:
    texts = ["a quick brown fox jumps", "over the lazy dog today"]
    m = text_generation_metrics(texts, texts)
    assert m["bleu"] == pytest.approx(100.0)
    assert m["rouge1"] == m["rouge2"] == m["rougeL"] == pytest.approx(1.0)
    assert m["ngram_similarity"] == pytest.approx(1.0)


def test_japanese_answers_are_compared_character_by_character_not_as_one_word():
    """Without spaces a Japanese sentence is one "word" to whitespace tokenisers, so a near-miss would score 0."""
    from llmtune.evaluation.metrics import text_generation_metrics

    close = text_generation_metrics(["試用期間は3か月です。"], ["試用期間は3ヶ月です。"])
    unrelated = text_generation_metrics(["会議は金曜日に開かれます。"], ["試用期間は3ヶ月です。"])
    assert close["rougeL"] == pytest.approx(0.9) and unrelated["rougeL"] < 0.3
    assert close["bleu"] > 50 > unrelated["bleu"] and close["ngram_similarity"] > unrelated["ngram_similarity"]
    english = text_generation_metrics(["Probation lasts three months."], ["Probation lasts 3 months."])
    assert english["rougeL"] == pytest.approx(0.75)     # English keeps rouge-score's own words and stems
