"""Every export proves itself: the exported model re-predicts the run's test rows and must agree with the run."""

import json
import time
from pathlib import Path

from llmtune.errors import UserError
from llmtune.evaluation.metrics import rouge, text_generation_metrics
from llmtune.inference import load_run
from llmtune.files import write_atomic


def run_predictions(run_dir: Path) -> list[dict]:
    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no predictions.jsonl (the run did not finish?): export a completed run")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_parity(run_dir: Path, model_path: Path, min_agreement: float, trust_remote_code: bool = False) -> dict:
    """Agreement of the exported model with the run's own test predictions (the share of equal labels; Q&A: the
    mean ROUGE-L of each answer against the run's) and the change in the run's headline metric (accuracy; Q&A:
    ROUGE-L against the references), and for a classification the largest change in any label's probability
    (max_prob_diff), written beside it (a folder's parity.json, or <file>.parity.json); below min_agreement it raises
    (the files stay, for inspection)."""
    rows = run_predictions(run_dir)
    started = time.perf_counter()
    exported = load_run(run_dir, model_path, trust_remote_code=trust_remote_code)
    texts, desc = [r["text"] for r in rows], f"parity: {model_path.name}"
    qa = exported.labels is None
    if qa:  # greedy answers, so an unchanged model repeats them word for word
        predicted, metric = [a["answer"] for a in exported.answer(texts, desc=desc)], "rougeL"
        probabilities = {}
        def score(answers):
            return text_generation_metrics(answers, [r["gold"] for r in rows])["rougeL"]
    else:
        classified = exported.classify(texts, desc=desc)
        predicted, metric = [p["label"] for p in classified], "accuracy"
        probabilities = {"max_prob_diff": max_probability_difference(classified, rows)}
        def score(labels):
            return sum(label == r["gold"] for label, r in zip(labels, rows)) / len(rows)
    identical = sum(p == r["predicted"] for p, r in zip(predicted, rows))
    # Q&A agreement is the mean ROUGE-L of each answer against the run's own: once a rounding difference flips one
    # greedy token the rest of the answer drifts, so word-for-word identity alone would fail sound exports.
    agreement = (sum(1.0 if p == r["predicted"] else rouge([p], [r["predicted"]])["rougeL"]
                     for p, r in zip(predicted, rows)) / len(rows) if qa else identical / len(rows))
    run_score, export_score = score([r["predicted"] for r in rows]), score(predicted)
    parity = {"model": str(model_path), "rows": len(rows), "agreement": round(agreement, 4),
              "identical": identical, "metric": metric, "run_score": round(run_score, 4),
              "export_score": round(export_score, 4), "delta": round(export_score - run_score, 4),
              **probabilities,
              "min_agreement": min_agreement, "passed": agreement >= min_agreement,
              "seconds": round(time.perf_counter() - started, 1)}
    report = (model_path / "parity.json" if model_path.is_dir()
              else model_path.with_name(model_path.name + ".parity.json"))
    write_atomic(report, json.dumps(parity, indent=2) + "\n")
    if not parity["passed"]:
        raise UserError(f"export check failed: {model_path} agrees with the run on {parity['agreement']:.1%} of "
                        f"{len(rows)} test rows ({identical} identical), below min_agreement={min_agreement}; the files "
                        f"are kept for inspection (details in {report}): export at higher precision, or lower "
                        "min_agreement")
    return parity


def max_probability_difference(classified: list[dict], rows: list[dict]) -> float | None:
    """The largest difference between the export's and the run's probability of any label on any row (None for a
    run whose predictions.jsonl has no probabilities)."""
    if not all("scores" in r for r in rows):
        return None
    return round(max(abs(p["scores"][label] - r["scores"][label]) for p, r in zip(classified, rows)
                     for label in r["scores"]), 5)
