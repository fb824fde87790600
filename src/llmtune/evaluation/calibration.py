"""How far a classifier's confidence can be trusted: expected calibration error, Brier score, the reliability curve,
and temperature scaling (Guo et al., 2017: one scalar T fitted on validation; softmax(logits / T) keeps every argmax,
so accuracy never changes, while the confidences move towards the observed accuracy)."""

import math

import torch
import torch.nn.functional as F

ECE_BINS = 15
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, gold: torch.Tensor) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises the negative log-likelihood of gold (label indices)
    under softmax(logits / T).

    Fitted as log T (so T stays positive) with L-BFGS; 1.0 when there is nothing to fit on. Bounded because a
    validation split the model gets entirely right has no finite optimum (T -> 0 makes every confidence 1)."""
    if len(gold) == 0:
        return 1.0
    logits = logits.double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), gold)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE) if math.isfinite(temperature) else 1.0


def negative_log_likelihood(logits: torch.Tensor, gold: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, gold)) if len(gold) else float("nan")


def reliability_bins(probs: torch.Tensor, gold: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Rows grouped by their top-label confidence into `bins` equal-width bins: each non-empty bin's row count, mean
    confidence and accuracy."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == gold).double()
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 (impossible above 1/labels) in bin 0.
    index = (torch.ceil(confidence.double() * bins).long() - 1).clamp(0, bins - 1)
    out = []
    for i in range(bins):
        members = index == i
        if members.any():
            out.append({"low": i / bins, "high": (i + 1) / bins, "n": int(members.sum()),
                        "confidence": float(confidence[members].double().mean()),
                        "accuracy": float(correct[members].mean())})
    return out


def expected_calibration_error(probs: torch.Tensor, gold: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Sum over confidence bins of (rows in bin / rows) x |accuracy - mean confidence| (15 equal-width bins)."""
    n = len(gold)
    return sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, gold, bins))


def brier_score(probs: torch.Tensor, gold: torch.Tensor) -> float:
    """Mean over rows of the squared distance between the label probabilities and the one-hot gold label (0 best,
    2 worst)."""
    one_hot = F.one_hot(gold, probs.shape[1]).double()
    return float(((probs.double() - one_hot) ** 2).sum(dim=1).mean())


def calibration_metrics(probs: torch.Tensor, gold: torch.Tensor) -> dict:
    return {"ece": expected_calibration_error(probs, gold), "brier": brier_score(probs, gold)}
