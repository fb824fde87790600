"""The command line as a user runs it: a real tiny-model job end to end, and one clear line for bad input."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_server import run_llmtune_in
from peft import PeftModel

REPO = Path(__file__).resolve().parents[1]


def llmtune(args: list[str], run_dir: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    # An empty HF cache: a seed model must not be found there, whatever this machine has downloaded.
    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(cache_dir / "empty-hf-cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return run_llmtune_in(REPO, [*args, f"hydra.run.dir={run_dir}"], env)


def test_tiny_job_end_to_end(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = llmtune(["model=tiny", "trainer.max_epochs=1", "dataset.split.train_per_class=20",
                      "dataset.split.test_per_class=10"], run_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tuned" in result.stdout and "accuracy" in result.stdout

    summary = json.loads((run_dir / "metrics.json").read_text())
    assert set(summary["results"]) == {"base", "tuned", "val"}
    assert summary["logged"]["test/accuracy"] == summary["results"]["tuned"]["accuracy"]
    assert summary["logged"]["val/accuracy"] == summary["results"]["val"]["accuracy"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert summary["run"]["n_train"] == 60 and summary["run"]["n_test"] == 30
    assert summary["results"]["tuned"]["n"] == 30
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 30
    assert set(predictions[0]) >= {"id", "text", "gold", "predicted", "scores", "base_predicted", "base_scores"}
    assert sum(predictions[0]["scores"].values()) == pytest.approx(1.0, abs=1e-3)
    accuracy = sum(p["gold"] == p["predicted"] for p in predictions) / 30
    assert summary["results"]["tuned"]["accuracy"] == pytest.approx(accuracy)
    for name in ("report.md", "confusion_matrix.png", ".hydra/config.yaml", "config.yaml", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.partial"))
    assert "train/loss" in (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "exists and is not empty" not in result.stderr

    from conftest import compose_config

    from llmtune.models.loader import load_base_model
    _, base = load_base_model(str(cache_dir / "models" / "tiny"), compose_config(["model=tiny"]).model)
    assert isinstance(PeftModel.from_pretrained(base, run_dir / "adapter"), PeftModel)


def test_print_config_needs_no_model(tmp_path, cache_dir):
    result = llmtune(["--cfg", "job", "model=tiny", "method=instruct", "rag=false"], tmp_path / "r", cache_dir)
    assert result.returncode == 0 and "name: tiny" in result.stdout and "loss_on: answer" in result.stdout


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case,args,expected", [
    ("missing file", ["dataset=financial_phrasebank", "dataset.path=nowhere/data.csv"], "dataset file not found"),
    ("no text column", ["dataset=financial_phrasebank", "dataset.path={wrong_columns}"], "has no column for dataset.text_column='text'"),
    ("empty dataset", ["dataset=financial_phrasebank", "dataset.path={empty}"], "has no rows"),
    ("unknown label", ["dataset=financial_phrasebank", "dataset.path={bullish}"], "label 'bullish', which is not"),
    ("model not available offline", ["model=gemma2b", "model.source.hub_id=acme/no-such-model"],
     "model 'acme/no-such-model' is not in the Hugging Face cache"),
    ("seed model not downloaded", ["model=llama3_8b"],
     "model 'meta-llama/Meta-Llama-3-8B-Instruct' is not in the Hugging Face cache"),
    ("empty documents folder", ["model=tiny", "dataset=hr_demo", "rag=true", "dataset.documents={empty_dir}"],
     "has no .txt, .md, .pdf files"),
    ("unreadable PDF", ["model=tiny", "dataset=hr_demo", "rag=true", "dataset.documents={bad_pdf_dir}"],
     "could not read PDF"),
    ("rag without documents", ["model=tiny", "dataset=hr_demo", "rag=true", "dataset.documents=null"],
     "rag=true retrieves from dataset.documents, which dataset=hr_demo does not set"),
    ("misspelled key", ["trainer.max_epoch=1"], "did you mean 'trainer.max_epochs'"),
    ("misspelled option", ["method=instrcut"], "did you mean 'instruct'"),
])
def test_bad_input_gets_one_line_and_exit_code_2(tmp_path, cache_dir, case, args, expected):
    files = {"wrong_columns": write(tmp_path / "cols.csv", "sentence,label\nup,positive\n"),
             "empty": write(tmp_path / "empty.csv", "text,label\n"),
             "bullish": write(tmp_path / "bull.csv", "text,label\nup,positive\nmoon,bullish\n"),
             "empty_dir": tmp_path / "no-docs", "bad_pdf_dir": tmp_path / "bad-docs"}
    files["empty_dir"].mkdir()
    files["bad_pdf_dir"].mkdir()
    write(files["bad_pdf_dir"] / "handbook.pdf", "%PDF-1.4 this is not really a PDF")
    run_dir = tmp_path / "run"
    result = llmtune([a.format(**files) for a in args], run_dir, cache_dir)
    assert result.returncode == 2, (case, result.stderr[-2000:])
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("llmtune: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if "model" in case:
        assert "model.path=DIR" in error_lines[0]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter").exists()
