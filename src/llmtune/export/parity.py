"""Every export proves itself: the exported model re-predicts the run's test rows and must agree with the run."""

import json
import time
from pathlib import Path

from llmtune.errors import UserError
from llmtune.inference import load_run
from llmtune.report.outputs import write_atomic


def run_predictions(run_dir: Path) -> list[dict]:
    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no predictions.jsonl (the run did not finish?): export a completed run")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_parity(run_dir: Path, model_path: Path, min_agreement: float) -> dict:
    """Label agreement and accuracy delta of the exported model against the run's own test predictions, written
    beside it (a folder's parity.json, or <file>.parity.json); below min_agreement it raises (the files stay, for
    inspection)."""
    rows = run_predictions(run_dir)
    started = time.perf_counter()
    exported = load_run(run_dir, model_path)
    predicted = [p["label"] for p in exported.classify([r["text"] for r in rows], desc=f"parity: {model_path.name}")]
    agree = sum(p == r["predicted"] for p, r in zip(predicted, rows))
    run_accuracy = sum(r["predicted"] == r["gold"] for r in rows) / len(rows)
    accuracy = sum(p == r["gold"] for p, r in zip(predicted, rows)) / len(rows)
    parity = {"model": str(model_path), "rows": len(rows), "agreement": round(agree / len(rows), 4),
              "disagreements": len(rows) - agree, "run_accuracy": round(run_accuracy, 4),
              "export_accuracy": round(accuracy, 4), "accuracy_delta": round(accuracy - run_accuracy, 4),
              "min_agreement": min_agreement, "passed": agree / len(rows) >= min_agreement,
              "seconds": round(time.perf_counter() - started, 1)}
    report = (model_path / "parity.json" if model_path.is_dir()
              else model_path.with_name(model_path.name + ".parity.json"))
    write_atomic(report, json.dumps(parity, indent=2) + "\n")
    if not parity["passed"]:
        raise UserError(f"export check failed: {model_path} agrees with the run on {agree}/{len(rows)} test rows "
                        f"({parity['agreement']:.1%}), below min_agreement={min_agreement}; the files are kept for "
                        f"inspection (details in {report}): export at higher precision, or lower min_agreement")
    return parity
