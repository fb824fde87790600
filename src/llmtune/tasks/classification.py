"""Classification: each row has one of dataset.labels; a language model scores every label after the prompt."""

from pathlib import Path

import torch
from omegaconf import DictConfig

from llmtune.data.labels import label_words
from llmtune.data.loading import load_rows
from llmtune.data.splits import make_splits
from llmtune.data.prompts import PromptFormat
from llmtune.evaluation.calibration import (calibration_metrics, fit_temperature, negative_log_likelihood,
                                            reliability_bins)
from llmtune.evaluation.intervals import bootstrap_intervals, classification_statistics
from llmtune.evaluation.metrics import classification_metrics
from llmtune.evaluation.scoring import classify, label_choice
from llmtune.rag.context import example_retriever
from llmtune import run_outputs
from llmtune.tasks.base import Task


class Classification(Task):
    name = "classification"
    headline = "accuracy"
    report_metrics = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")
    slice_metric = "macro_f1"
    answer_ends_with_eos = False  # a label is scored, never generated

    @property
    def labels(self) -> list[str]:
        """The label words (dataset.labels, or the words it maps raw values to)."""
        return label_words(self.dataset)

    def load_splits(self, seed: int) -> dict[str, list[dict]]:
        rows, given_by = load_rows(self.dataset, self.data_counts)
        # duplicates=drop: the same text in train and test would flatter the test score
        return make_splits(rows, self.dataset.split, seed, self.labels, "label", self.dataset.duplicates == "drop",
                           self.data_counts, given_by)

    def target(self, row: dict) -> str:
        return row["label"]

    def lm_predictions(self, model, tokenizer, rows, prompt_format: PromptFormat, eval_cfg: DictConfig, desc: str):
        return classify(model, tokenizer, rows, prompt_format, self.labels, eval_cfg.batch_size, desc)

    def metrics(self, predictions: list[dict]) -> dict:
        """Accuracy, precision/recall/F1, the confusion matrix, a 95% bootstrap interval for each headline figure, and
        the calibration of the reported confidences (ECE, Brier, reliability bins); `before_scaling` holds the same for
        softmax(logits), the confidences before temperature scaling."""
        predicted, gold = [p["predicted"] for p in predictions], [p["gold"] for p in predictions]
        metrics = classification_metrics(predicted, gold, self.labels)
        metrics["intervals"] = bootstrap_intervals(classification_statistics(predicted, gold, self.labels),
                                                   len(predictions))
        gold_ids, probs, logits = self._gold_ids(predictions), self._scores(predictions), self._logits(predictions)
        if probs is not None:
            metrics.update(calibration_metrics(probs, gold_ids), reliability=reliability_bins(probs, gold_ids))
        if logits is not None:
            raw = torch.softmax(logits, dim=1)
            metrics["before_scaling"] = {**calibration_metrics(raw, gold_ids),
                                         "reliability": reliability_bins(raw, gold_ids)}
        return metrics

    def fit_calibration(self, val_predictions: list[dict] | None) -> dict | None:
        """Temperature scaling fitted on the validation predictions' logits; None without validation rows (or
        logits)."""
        logits = self._logits(val_predictions or [])
        if logits is None:
            return None
        gold = self._gold_ids(val_predictions)
        temperature = fit_temperature(logits, gold)
        return {"method": "temperature scaling on validation", "temperature": temperature, "val_n": len(gold),
                "val_nll": {"before": negative_log_likelihood(logits, gold),
                            "after": negative_log_likelihood(logits, gold, temperature)}}

    def calibrate(self, predictions: list[dict], calibration: dict | None) -> list[dict]:
        """predictions with scores = softmax(logits / temperature) (the predicted label cannot change: T > 0)."""
        logits = self._logits(predictions)
        if calibration is None or logits is None:
            return predictions
        probs = torch.softmax(logits / calibration["temperature"], dim=1)
        return [{**p, "scores": label_choice(self.labels, row)[1]} for p, row in zip(predictions, probs)]

    def _gold_ids(self, predictions: list[dict]) -> torch.Tensor:
        return torch.tensor([self.labels.index(p["gold"]) for p in predictions])

    def _scores(self, predictions: list[dict]) -> torch.Tensor | None:
        return self._by_label(predictions, "scores")

    def _logits(self, predictions: list[dict]) -> torch.Tensor | None:
        return self._by_label(predictions, "logits")

    def _by_label(self, predictions: list[dict], key: str) -> torch.Tensor | None:
        """[rows, labels] of each prediction's per-label values under key; None if any prediction lacks them."""
        if not predictions or not all(set(p.get(key) or ()) == set(self.labels) for p in predictions):
            return None
        return torch.tensor([[p[key][label] for label in self.labels] for p in predictions], dtype=torch.float64)

    def retriever(self, retriever_cfg, train, cache_dir):
        """The k labelled training rows nearest each row's text, as demonstrations."""
        return example_retriever(retriever_cfg, train, cache_dir)

    def figures(self, run_dir: Path, results: dict, tuned_name: str) -> list[str]:
        return [*run_outputs.plot_confusion(run_dir, results, tuned_name),
                *run_outputs.plot_reliability(run_dir, results, tuned_name)]

    def report_detail(self, results: dict, records: list[dict], tuned_name: str) -> list[str]:
        return [*run_outputs.classification_detail(results["tuned"], tuned_name),
                *run_outputs.slice_detail(results, self.dataset.get("slice_column"), self, tuned_name)]
