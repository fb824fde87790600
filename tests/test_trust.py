"""Results to trust: the best validation checkpoint restored, temperature scaling, calibration figures and bootstrap
intervals, each against a case whose answer is known."""

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import open_dict
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from conftest import compose_config
from llmtune.evaluation.calibration import (MAX_TEMPERATURE, MIN_TEMPERATURE, brier_score, expected_calibration_error,
                                            fit_temperature, negative_log_likelihood)
from llmtune.evaluation.intervals import bootstrap_intervals, classification_statistics
from llmtune.evaluation.metrics import classification_metrics
from llmtune.tasks import task_of

LABELS = ["positive", "negative", "neutral"]


# --- bootstrap intervals -------------------------------------------------------------------------------------------

def test_bootstrap_interval_of_three_right_in_four_is_a_quarter_to_one():
    # Resampling 4 rows of which 3 are right: the accuracy is k/4 with k ~ Binomial(4, 3/4), so
    # P(acc <= 0) = 1/256 < 2.5% < P(acc <= 1/4) = 13/256 and P(acc = 1) = 81/256 > 2.5%:
    # the 2.5th percentile is 0.25 and the 97.5th is 1.0.
    gold = ["positive", "negative", "neutral", "positive"]
    predicted = ["positive", "negative", "neutral", "negative"]
    intervals = bootstrap_intervals(classification_statistics(predicted, gold, LABELS), len(gold))
    assert intervals["accuracy"] == [0.25, 1.0]


def test_bootstrap_interval_of_an_accuracy_on_900_rows_matches_the_normal_approximation():
    # 783 of 900 right (0.87): the sampling standard error is sqrt(0.87 * 0.13 / 900) = 0.0112, so the 95% interval is
    # about 0.87 +- 1.96 x 0.0112 = [0.848, 0.892]; 1,000 resamples put each end within a few thousandths of it.
    correct = np.array([1.0] * 783 + [0.0] * 117)
    low, high = bootstrap_intervals(lambda rows: {"accuracy": correct[rows].mean()}, len(correct))["accuracy"]
    half_width = 1.96 * math.sqrt(0.87 * 0.13 / 900)
    assert low == pytest.approx(0.87 - half_width, abs=0.005) and high == pytest.approx(0.87 + half_width, abs=0.005)


def test_bootstrap_is_seeded_and_empty_without_rows():
    statistics = classification_statistics(["positive", "negative"] * 5, ["positive"] * 10, LABELS)
    assert bootstrap_intervals(statistics, 10) == bootstrap_intervals(statistics, 10)
    assert bootstrap_intervals(statistics, 0) == {}


def test_resampled_statistics_are_sklearns_on_the_same_rows():
    rng = np.random.default_rng(3)
    gold = [LABELS[i] for i in rng.integers(0, 3, 60)]
    # mostly right, some wrong, and a few answers outside the label set (wrong, and no label's prediction)
    predicted = [g if r < 0.6 else ("unsure" if r > 0.95 else LABELS[int(r * 100) % 3])
                 for g, r in zip(gold, rng.random(60))]
    statistics = classification_statistics(predicted, gold, LABELS)
    whole = statistics(np.arange(60))
    metrics = classification_metrics(predicted, gold, LABELS)
    for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1"):
        assert whole[name] == pytest.approx(metrics[name])
    for rows in rng.integers(0, 60, size=(5, 60)):
        g, p = [gold[i] for i in rows], [predicted[i] for i in rows]
        expected = {"accuracy": accuracy_score(g, p),
                    "macro_precision": precision_score(g, p, labels=LABELS, average="macro", zero_division=0),
                    "macro_recall": recall_score(g, p, labels=LABELS, average="macro", zero_division=0),
                    "macro_f1": f1_score(g, p, labels=LABELS, average="macro", zero_division=0),
                    "weighted_f1": f1_score(g, p, labels=LABELS, average="weighted", zero_division=0)}
        assert statistics(rows) == pytest.approx(expected)


# --- calibration ---------------------------------------------------------------------------------------------------

def test_ece_and_brier_of_a_hand_computed_case():
    # Confidences 0.9, 0.9 (one right, one wrong) and 0.65, 0.65 (both right): two bins of half the rows each,
    # ECE = 0.5 x |0.5 - 0.9| + 0.5 x |1 - 0.65| = 0.375; Brier = (0.02 + 1.62 + 0.245 + 0.245) / 4 = 0.5325.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.35, 0.65], [0.35, 0.65]], dtype=torch.float64)
    gold = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(probs, gold) == pytest.approx(0.375)
    assert brier_score(probs, gold) == pytest.approx(0.5325)


def overconfident_logits(scale: float, n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gold labels drawn from softmax(true logits); the model's logits are the true ones times scale (> 1:
    overconfident, < 1: underconfident), so the right temperature is about `scale`."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = 2 * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    gold = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    return true_logits * scale, gold


@pytest.mark.parametrize("scale", [4.0, 0.4])
def test_temperature_scaling_recovers_the_scale_keeps_every_argmax_and_lowers_the_nll(scale):
    logits, gold = overconfident_logits(scale)
    temperature = fit_temperature(logits, gold)
    assert temperature == pytest.approx(scale, rel=0.25)
    assert negative_log_likelihood(logits, gold, temperature) < negative_log_likelihood(logits, gold) - 0.05
    assert torch.equal((logits / temperature).argmax(1), logits.argmax(1))


def test_a_validation_split_the_model_gets_all_right_gives_a_small_temperature_not_zero():
    # Every row right: the NLL falls towards 0 as T -> 0, with no optimum; the fit stops at a small bounded T.
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    assert MIN_TEMPERATURE <= fit_temperature(logits, torch.tensor([0, 1, 2])) < 0.1
    assert fit_temperature(-logits, torch.tensor([0, 1, 2])) <= MAX_TEMPERATURE  # every row wrong: T -> infinity


def test_task_calibration_keeps_accuracy_and_lowers_val_nll(cache_dir):
    task = task_of(compose_config(["dataset=sentiment_demo"], cache=cache_dir))
    logits, gold = overconfident_logits(5.0, n=300)
    test_logits, test_gold = overconfident_logits(5.0, n=300, seed=1)

    def records(logits, gold):
        return [{"gold": LABELS[g], "predicted": LABELS[int(row.argmax())],
                 "logits": dict(zip(LABELS, row.tolist())),
                 "scores": dict(zip(LABELS, torch.softmax(row, 0).tolist()))} for row, g in zip(logits, gold)]

    calibration = task.fit_calibration(records(logits, gold))
    assert calibration["temperature"] > 2 and calibration["val_nll"]["after"] < calibration["val_nll"]["before"]
    test = records(test_logits, test_gold)
    calibrated = task.calibrate(test, calibration)
    before, after = task.metrics(test), task.metrics(calibrated)
    assert [p["predicted"] for p in calibrated] == [p["predicted"] for p in test]
    assert after["accuracy"] == before["accuracy"] and after["intervals"] == before["intervals"]
    assert after["ece"] < before["ece"] / 2  # the test rows were not fitted on, and still come out better calibrated
    assert after["before_scaling"]["ece"] == pytest.approx(before["ece"], abs=1e-9)


# --- model selection on validation, on a task the tiny model learns in a few steps ---------------------------------

WORDS = {"positive": "sunny bright cheerful", "negative": "rainy stormy gloomy", "neutral": "cloudy grey plain"}


def write_learnable_data(path: Path) -> Path:
    """Each label's texts share three words no other label uses: learnable in a few steps from random weights."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"])
        for i in range(90):
            label = LABELS[i % 3]
            writer.writerow([f"r{i}", f"report {i}: {WORDS[label]}", label])
    return path


class SpoilTheHeadInTheLastEpoch(L.Callback):
    """Zeroes the classification head after every step of the last epoch: all logits 0, every row predicted as the
    first label, so the last epoch's validation accuracy is 1/3, worse on purpose."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                for name, weight in pl_module.named_parameters():
                    if ".score." in name and weight.requires_grad:
                        weight.zero_()


def run_learnable(tmp_path: Path, tiny_model_dir: Path, cache_dir: Path, overrides: list[str],
                  name: str) -> tuple[dict, list[dict]]:
    """A classifier run of the tiny model on the learnable data; its metrics.json and the validations' rows of
    logs/metrics.csv (val/accuracy and step)."""
    from llmtune.run import run

    data = write_learnable_data(tmp_path / "learnable.csv")
    cfg = compose_config(["model=tiny", "method=classifier", "method.optimizer.lr=3e-2", "trainer.batch_size=6",
                          f"dataset.path={data}", "dataset.split.train_per_class=10",
                          "dataset.split.val_per_class=5", "dataset.split.test_per_class=10", "eval.baseline=false",
                          *overrides], tmp_path / name, cache_dir)
    with open_dict(cfg):
        cfg.model.path = str(tiny_model_dir)
    run(cfg)
    with open(tmp_path / name / "logs" / "metrics.csv", encoding="utf-8") as handle:
        # validation rows: val/loss beside val/accuracy (the run's closing row logs the final val/accuracy alone)
        validations = [row for row in csv.DictReader(handle) if row.get("val/accuracy") and row.get("val/loss")]
    return json.loads((tmp_path / name / "metrics.json").read_text()), validations


@pytest.mark.parametrize("select", ["best", "last"])
def test_the_best_validation_checkpoint_is_restored_before_the_test(tiny_model_dir, tmp_path, cache_dir, select):
    spoil = f"+callbacks.spoil._target_={__name__}.SpoilTheHeadInTheLastEpoch"
    summary, validations = run_learnable(tmp_path, tiny_model_dir, cache_dir,
                                         ["trainer.max_epochs=4", f"trainer.select={select}", spoil], select)
    accuracies = [float(row["val/accuracy"]) for row in validations]
    assert len(accuracies) == 4 and accuracies[-1] == pytest.approx(1 / 3)  # spoiled
    best = int(np.argmax(accuracies))  # the first of equals, as ModelCheckpoint keeps it
    assert accuracies[best] > 0.6
    selection = summary["train"]["selection"]
    assert selection["best_step"] == int(validations[best]["step"]) + 1  # the CSV logger's steps count from 0
    assert selection["best_val_accuracy"] == pytest.approx(accuracies[best])
    # The weights scored afterwards are the chosen ones: val scored again gives that validation's accuracy.
    expected = accuracies[best] if select == "best" else accuracies[-1]
    assert selection["select"] == select
    assert summary["results"]["val"]["accuracy"] == pytest.approx(expected)
    assert summary["train"]["stopped_by"] == "limit"


def test_a_resumed_run_remembers_the_best_validation_before_the_interruption(tiny_model_dir, tmp_path, cache_dir):
    """last.ckpt holds the selection's state as of its own validation, so a run continued from it (here with a last
    epoch spoiled on purpose) still restores the best weights of the first attempt, and keeps one best checkpoint."""
    first, validations = run_learnable(tmp_path, tiny_model_dir, cache_dir, ["trainer.max_epochs=2"], "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    state = next(value for key, value in torch.load(checkpoints / "last.ckpt", weights_only=False)["callbacks"].items()
                 if "val/accuracy" in key)
    best_before = max(float(row["val/accuracy"]) for row in validations)
    assert Path(state["best_model_path"]).name == f"best-{first['train']['selection']['best_step']}.ckpt"
    assert float(state["best_model_score"]) == pytest.approx(best_before) and best_before > 0.6

    spoil = f"+callbacks.spoil._target_={__name__}.SpoilTheHeadInTheLastEpoch"
    resumed, _ = run_learnable(tmp_path, tiny_model_dir, cache_dir, ["trainer.max_epochs=3", spoil], "run")
    assert resumed["train"]["resumed_from_step"] == first["train"]["steps"]
    assert resumed["train"]["selection"] == first["train"]["selection"]  # the spoiled third epoch is not chosen
    assert resumed["results"]["val"]["accuracy"] == pytest.approx(best_before)
    assert len(list(checkpoints.glob("best-*.ckpt"))) == 1


def test_early_stopping_ends_training_once_validation_stops_improving(tiny_model_dir, tmp_path, cache_dir):
    summary, validations = run_learnable(tmp_path, tiny_model_dir, cache_dir,
                                         ["trainer.max_epochs=30", "trainer.early_stopping.patience=2"], "early")
    accuracies = [float(row["val/accuracy"]) for row in validations]
    best = int(np.argmax(accuracies))
    assert summary["train"]["stopped_by"] == "early_stopping"
    assert len(accuracies) == best + 3 < 30  # two validations without improvement after the best one, then stop


def test_a_wall_budget_ends_training_and_still_writes_every_output(tiny_model_dir, tmp_path, cache_dir):
    summary, validations = run_learnable(tmp_path, tiny_model_dir, cache_dir,
                                         ["trainer.max_epochs=1000", "trainer.max_time=00:00:00:04"], "budget")
    assert summary["train"]["stopped_by"] == "max_time" and summary["train"]["epochs"] < 1000
    run_dir = tmp_path / "budget"
    for output in ("metrics.json", "predictions.jsonl", "report.md", "adapter/adapter_model.safetensors",
                   "reliability.png", "confusion_matrix.png", "prompt.json"):
        assert (run_dir / output).is_file(), output
    assert "at the trainer.max_time budget" in (run_dir / "report.md").read_text()
    assert summary["results"]["tuned"]["n"] == 30 and summary["calibration"]["temperature"] > 0
