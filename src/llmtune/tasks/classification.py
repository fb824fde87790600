"""Classification: each row has one of dataset.labels; a language model scores every label after the prompt."""

from pathlib import Path

from omegaconf import DictConfig

from llmtune.data.labels import label_words
from llmtune.data.loading import load_rows
from llmtune.data.splits import make_splits
from llmtune.data.prompts import PromptFormat
from llmtune.evaluation.metrics import classification_metrics
from llmtune.evaluation.scoring import classify
from llmtune.rag.context import example_retriever
from llmtune import run_outputs
from llmtune.tasks.base import Task


class Classification(Task):
    name = "classification"
    headline = "accuracy"
    report_metrics = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")
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
        return classification_metrics([p["predicted"] for p in predictions], [p["gold"] for p in predictions],
                                      self.labels)

    def retriever(self, retriever_cfg, train, cache_dir):
        """The k labelled training rows nearest each row's text, as demonstrations."""
        return example_retriever(retriever_cfg, train, cache_dir)

    def figures(self, run_dir: Path, results: dict, tuned_name: str) -> list[str]:
        return run_outputs.plot_confusion(run_dir, results, tuned_name)

    def report_detail(self, results: dict, records: list[dict], tuned_name: str) -> list[str]:
        return run_outputs.classification_detail(results["tuned"], tuned_name)
