"""Loggers, secrets, run status and multirun failures: what a job leaves for trackers, sweeps and reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import open_dict

from llmtune.tracking import (
    CLASSIFICATION_METRICS,
    FINAL_METRICS,
    QA_METRICS,
    REDACTED,
    final_metrics,
    public_config,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model=tiny", "trainer.max_epochs=1", "dataset.split.train_per_class=10", "dataset.split.val_per_class=5",
         "dataset.split.test_per_class=5"]


def test_final_metrics_names_and_sources():
    results = {"base": {"accuracy": 0.1, "macro_f1": 0.2}, "tuned": {"accuracy": 0.7, "macro_f1": 0.6},
               "val": {"accuracy": 0.8, "macro_f1": 0.75}}
    assert final_metrics(results) == {"val/accuracy": 0.8, "val/macro_f1": 0.75, "test/accuracy": 0.7,
                                      "test/macro_f1": 0.6, "base/test_accuracy": 0.1, "base/test_macro_f1": 0.2}
    assert set(final_metrics(results)) == set(CLASSIFICATION_METRICS)
    assert set(final_metrics({"tuned": results["tuned"]})) == {"test/accuracy", "test/macro_f1"}
    qa = {name: {"bleu": 12.5, "rougeL": 0.4, "ngram_similarity": 0.3, "token_presence": None}
          for name in ("base", "tuned", "val")}
    assert final_metrics(qa) == {"val/rougeL": 0.4, "test/bleu": 12.5, "test/rougeL": 0.4,
                                 "test/ngram_similarity": 0.3, "base/test_bleu": 12.5, "base/test_rougeL": 0.4,
                                 "base/test_ngram_similarity": 0.3}  # no token presence: no tokens were listed
    assert set(FINAL_METRICS) == set(CLASSIFICATION_METRICS) | set(QA_METRICS)


def test_public_config_masks_secret_keys_and_secret_env_values(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    cfg = compose_config(["model=tiny", "+hub_token=hf_given_on_the_command_line",
                          "+dataset.note=prefix-hf_from_the_environment"], tmp_path)
    with open_dict(cfg):
        cfg.generation = {"max_new_tokens": 12}
    public = public_config(cfg)
    assert public["hub_token"] == REDACTED
    assert public["dataset"]["note"] == f"prefix-{REDACTED}"
    assert public["generation"]["max_new_tokens"] == 12  # "tokens" in a name is not a secret
    assert public["model"]["name"] == "tiny" and "hydra" not in public
    assert "hf_from_the_environment" not in json.dumps(public) and "hf_given" not in json.dumps(public)


def test_same_seed_reproduces_metrics_and_tensorboard_logs(tiny_model_dir, cache_dir, tmp_path):
    from llmtune.run import run

    def job(name, seed):
        cfg = compose_config([*SMALL, "logger=tensorboard", f"seed={seed}"], tmp_path / name, cache_dir)
        with open_dict(cfg):
            cfg.model.path = str(tiny_model_dir)
        run(cfg)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        predictions = (tmp_path / name / "predictions.jsonl").read_text()
        return metrics, predictions

    first, again, other = job("a", 3), job("b", 3), job("c", 4)
    assert first[0]["results"] == again[0]["results"] and first[0]["logged"] == again[0]["logged"]
    assert first[1] == again[1]  # every probability, to the printed digit
    assert first[0]["train"]["tokens"] == again[0]["train"]["tokens"]
    ids = [json.loads(line)["id"] for line in first[1].splitlines()]
    other_ids = [json.loads(line)["id"] for line in other[1].splitlines()]
    assert ids != other_ids  # the seed also draws the split
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))


def test_multirun_records_a_failed_job_and_finishes_the_others_with_offline_wandb(tmp_path, cache_dir):
    secret = "hf_do_not_write_me_anywhere_123"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "HYDRA_FULL_ERROR"}
    env.update(HOME=str(home), LLMTUNE_CACHE=str(cache_dir), HF_HUB_OFFLINE="1")
    sweep_dir = tmp_path / "grid"
    result = subprocess.run(
        [sys.executable, "-m", "llmtune", "-m", *SMALL, "logger=wandb", "eval.batch_size=0,8",
         f"+hf_token={secret}", f"hydra.sweep.dir={sweep_dir}"],
        check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 job(s) failed" in result.stderr and "Traceback" not in result.stderr
    failed, finished = sorted(sweep_dir.glob("*_tiny-instruct-rag=False"))
    assert json.loads((failed / "status.json").read_text())["status"] == "failed"
    error = json.loads((failed / "status.json").read_text())["error"]
    assert "eval.batch_size=0 must be greater than or equal to 1" in error
    assert (failed / "config.yaml").is_file() and not (failed / "metrics.json").exists()
    assert json.loads((finished / "status.json").read_text())["status"] == "completed"
    logged = json.loads((finished / "metrics.json").read_text())["logged"]
    assert set(logged) == set(CLASSIFICATION_METRICS)
    offline_runs = list((finished / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 1
    assert b"test/accuracy" in offline_runs[0].read_bytes()
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.parametrize("config", sorted(p.stem for p in (REPO / "conf" / "logger").glob("*.yaml")))
def test_every_logger_config_composes_with_a_run_directory(config, tmp_path):
    cfg = compose_config([f"logger={config}"], tmp_path)
    assert cfg.logger._target_ and str(tmp_path) in cfg.logger.save_dir


def test_wandb_with_a_key_but_no_server_falls_back_to_offline(tmp_path, cache_dir):
    key = "0123456789abcdef0123456789abcdef01234567"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "HYDRA_FULL_ERROR"}
    # Port 9 (discard) on loopback: nothing listens, so the online start fails as it would without a network.
    env.update(HOME=str(home), LLMTUNE_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", WANDB_API_KEY=key,
               WANDB_BASE_URL="http://127.0.0.1:9")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "llmtune", *SMALL, "logger=wandb", "logger.init_timeout=5", f"hydra.run.dir={run_dir}"],
        check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B online start failed" in result.stderr and "logging offline instead" in result.stderr
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()] == []


def test_a_run_continued_in_its_folder_continues_its_wandb_run(tmp_path, cache_dir):
    """A resumed run (here: a longer budget in the same folder) logs to the W&B run it started, not to a second one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "HYDRA_FULL_ERROR"}
    env.update(LLMTUNE_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    run_dir = tmp_path / "run"
    for epochs in (1, 2):
        result = subprocess.run(
            [sys.executable, "-m", "llmtune", *SMALL, f"trainer.max_epochs={epochs}", "logger=wandb",
             f"hydra.run.dir={run_dir}"], check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    attempts = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(name.endswith(f"-{run_id}") for name in attempts), (run_id, attempts)
    assert f"offline-run-*-{run_id}` (its 2 attempts, in order)" in result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["resumed_from_step"] > 0


def test_under_a_wandb_agent_the_agent_names_the_run(tmp_path, monkeypatch):
    from llmtune.tracking import run_id_of

    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = run_id_of(tmp_path)
    assert first and run_id_of(tmp_path) == first == (tmp_path / "wandb" / "run_id").read_text().strip()
    monkeypatch.setenv("WANDB_RUN_ID", "agent-given")
    assert run_id_of(tmp_path / "other") is None and not (tmp_path / "other").exists()
