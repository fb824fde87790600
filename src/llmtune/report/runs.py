"""Find the runs under a folder and read what each left behind: status, config, final metrics, predictions."""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from llmtune.evaluation import judge
from llmtune.report.params import drop_location_values, flatten_config
from llmtune.run_state import read_status
from llmtune.tracking import FINAL_METRICS, final_metrics

# What a report can rank by: the metrics a run logs, and the LLM judge's means (eval.judge), which metrics.json keeps
# in its results (trackers are not sent them).
RANKABLE_METRICS = tuple(dict.fromkeys(FINAL_METRICS + judge.REPORT_METRICS))

# A folder holding either file is a run: status.json appears when a run starts, metrics.json when it ends
# (legacy runs wrote only metrics.json).
RUN_MARKERS = ("status.json", "metrics.json")


@dataclass
class Run:
    name: str  # path relative to the folder being reported on
    path: Path
    status: str  # completed | failed | incomplete
    error: str | None
    config: dict  # flattened dot keys, see params.flatten_config
    metrics: dict[str, float]  # the RANKABLE_METRICS this run has
    summary: dict  # metrics.json as written ({} until the run completes)
    tuned_correct: dict | None  # test id -> tuned prediction == gold, from predictions.jsonl
    base_correct: dict | None  # the same for the base model, when it was scored


def find_run_dirs(root: Path) -> list[Path]:
    """Every run folder under root, root included; a run's own subfolders (adapter/, logs/, wandb/...) are skipped."""
    found = []
    for folder, subfolders, files in os.walk(root):
        if any(marker in files for marker in RUN_MARKERS):
            found.append(Path(folder))
            subfolders.clear()
        else:
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
    return sorted(found, key=natural_order)


def natural_order(path: Path) -> list:
    """'2_tiny' before '10_tiny': Hydra numbers multirun jobs without leading zeros."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def read_run_record(path: Path, root: Path) -> Run:
    # The root itself being a run (`llmtune report outputs/<date>/<run>`) gets its folder name rather than ".".
    name = path.name if path == root else path.relative_to(root).as_posix()
    config = read_config(path)
    try:
        status, summary = read_status(path), _read_json(path / "metrics.json")
    except ValueError as error:
        return Run(name, path, "incomplete", f"unreadable run files: {error}", config, {}, {}, None, None)
    state, error = _state(status, summary)
    summary = summary if state == "completed" else {}
    metrics = {}
    if summary:
        logged = summary.get("logged") or final_metrics(summary["results"])  # older runs kept only "results"
        metrics = {name: logged[name] for name in FINAL_METRICS if name in logged}
        metrics.update(judge.reported_metrics(summary["results"]))
    # Right/wrong per test row, for McNemar's test; a generated Q&A answer is not right or wrong as a whole.
    classified = summary and "confusion_matrix" in summary["results"].get("tuned", {})
    tuned_correct, base_correct = read_correctness(path / "predictions.jsonl") if classified else (None, None)
    return Run(name, path, state, error, config, metrics, summary, tuned_correct, base_correct)


def read_config(path: Path) -> dict:
    """config.yaml (resolved, written when the run starts), else Hydra's unresolved .hydra/config.yaml, else {}."""
    for candidate in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if candidate.is_file():
            tree = OmegaConf.to_container(OmegaConf.load(candidate), resolve=False)
            return drop_location_values(flatten_config(tree), tree)
    return {}


def read_correctness(path: Path) -> tuple[dict | None, dict | None]:
    """(id -> tuned prediction right, id -> base prediction right or None when the base was not scored)."""
    if not path.is_file():
        return None, None
    tuned, base = {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            tuned[row["id"]] = row["predicted"] == row["gold"]
            if "base_predicted" in row:
                base[row["id"]] = row["base_predicted"] == row["gold"]
    return tuned, (base or None)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path.name}: {error}") from None


def _state(status: dict | None, summary: dict | None) -> tuple[str, str | None]:
    """(completed | failed | killed | incomplete, error). No status.json: a legacy run, complete if it has metrics."""
    if status is None:
        return "completed", None  # found by its metrics.json
    if status.get("status") == "completed":
        return ("completed", None) if summary is not None else ("incomplete", "completed, but metrics.json is missing")
    if status.get("status") == "failed":
        return "failed", status.get("error") or "failed without an error message"
    if status.get("status") == "killed":  # read_status found its process gone
        return "killed", status.get("error")
    if status.get("status") == "running":
        # Running still, or killed on another machine (read_status can only check processes on this one).
        return "incomplete", f"started {status.get('started')} and never finished (killed, or still running)"
    return "incomplete", f"unknown status {status.get('status')!r} in status.json"
