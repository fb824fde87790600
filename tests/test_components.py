"""A new Task or Method is one Python file and one YAML outside llmtune: run.py composes them without an edit."""

import json
import os
from pathlib import Path

from conftest import run_llmtune

TOY = Path(__file__).parent / "toy_components"


def run_with_toys(args: list[str], cache_dir: Path, run_dir: Path):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOY), os.environ.get("PYTHONPATH")]))
    os.environ["LLMTUNE_CONFIG_PATH"] = str(TOY / "conf")
    try:
        return run_llmtune([*args, f"hydra.run.dir={run_dir}"], cache_dir)
    finally:
        del os.environ["LLMTUNE_CONFIG_PATH"]
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].removeprefix(str(TOY)).lstrip(os.pathsep)


def test_a_task_from_outside_the_package_runs_end_to_end(cache_dir, tmp_path):
    result = run_with_toys(["model=tiny", "task=length_bucket", "trainer.max_epochs=1"], cache_dir, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["run"]["task"] == "length_bucket" and summary["run"]["n_test"] == 30
    assert set(summary["results"]["tuned"]["per_label"]) == {"short", "long"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| accuracy |" in report and "| macro_precision |" not in report  # the task's own table rows


def test_a_method_from_outside_the_package_runs_end_to_end(cache_dir, tmp_path):
    result = run_with_toys(["model=tiny", "method=majority"], cache_dir, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert summary["run"]["method"] == "majority" and "base" not in summary["results"]
    assert len({p["predicted"] for p in predictions}) == 1  # one answer for every row
    share = sum(p["gold"] == p["predicted"] for p in predictions) / len(predictions)
    assert summary["results"]["tuned"]["accuracy"] == share
    assert not (tmp_path / "run" / "adapter").exists()  # nothing trained, nothing saved
