"""McNemar's exact test: do two classifiers scored on the same test rows differ by more than chance?"""

from scipy.stats import binomtest


def discordant_counts(correct_a: dict, correct_b: dict) -> tuple[int, int]:
    """(b, c): rows A gets right and B wrong, and the opposite; rows are matched by id, which must be the same."""
    if correct_a.keys() != correct_b.keys():
        raise ValueError("the two prediction sets cover different test ids")
    b = sum(correct_a[row] and not correct_b[row] for row in correct_a)
    c = sum(correct_b[row] and not correct_a[row] for row in correct_a)
    return b, c


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value. Rows both get right (or both wrong) say nothing about which is better; if A and B were
    equally good, each of the b + c discordant rows would favour A with probability 1/2."""
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5).pvalue)


def mcnemar_p(correct_a: dict, correct_b: dict) -> float:
    return mcnemar_exact(*discordant_counts(correct_a, correct_b))
