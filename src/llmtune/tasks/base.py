"""A Task owns its data and its judgement: loading and splitting rows, how a language model answers a row, the metrics,
the headline metric, its part of the report, and what a finished run does with new texts (predict, serve, export).

A Method (llmtune.methods) owns the model: how it is built, trained, scored and saved. A run is one Task x one Method,
both instantiated from the config, so run.py has no branch on either.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from llmtune.data.prompts import PromptFormat
from llmtune.data.truncation import truncate_texts


class Task(ABC):
    name: str
    headline: str  # the metric a run returns (what sweeps optimise) and the report ranks by
    report_metrics: tuple[str, ...]  # rows of the base-vs-tuned table; the first two also summarise validation
    slice_metric: str  # shown beside the headline for each value of dataset.slice_column
    answer_ends_with_eos: bool  # training answers end with EOS where the model must learn to stop generating

    def __init__(self, dataset: DictConfig):
        self.dataset = dataset
        self.data_counts: dict = {}  # rows read, skipped and dropped by load_splits, for metrics.json and the report

    @property
    def labels(self) -> list[str] | None:
        """The answers a classifier chooses between; None where answers are free text."""
        return None

    @abstractmethod
    def load_splits(self, seed: int) -> dict[str, list[dict]]:
        """{"train", "val", "test"} rows, each {id, text, ...} with what the task judges against; data_counts says
        what was read and left out."""

    @abstractmethod
    def target(self, row: dict) -> str:
        """The text a model is trained to answer for the row."""

    @abstractmethod
    def lm_predictions(self, model, tokenizer, rows: list[dict], prompt_format: PromptFormat, eval_cfg: DictConfig,
                       desc: str) -> list[dict]:
        """How a language model answers rows: {id, text, gold, predicted, ...} per row, in order."""

    @abstractmethod
    def metrics(self, predictions: list[dict]) -> dict:
        """Every metric of the predictions, with `n`."""

    def slice_metrics(self, predictions: list[dict]) -> dict[str, dict] | None:
        """dataset.slice_column: {value: {n, headline and slice_metric, intervals}} over the predictions of each
        value, values in natural order (numbers by value); None where the rows carry no slice."""
        if not any("slice" in p for p in predictions):
            return None
        groups: dict[str, list[dict]] = {}
        for p in predictions:
            groups.setdefault(str(p.get("slice", "(empty)")), []).append(p)
        keep = (self.headline, self.slice_metric)
        slices = {}
        for value in sorted(groups, key=_natural_order):
            scores = self.metrics(groups[value])
            slices[value] = {"n": len(groups[value]), **{name: scores[name] for name in keep},
                             "intervals": {name: scores["intervals"][name] for name in keep
                                           if name in scores.get("intervals", {})}}
        return slices

    @abstractmethod
    def retriever(self, retriever_cfg: DictConfig, train: list[dict], cache_dir: str | Path
                  ) -> tuple[Callable, dict]:
        """rag=true: (add(rows, exclude_own=False), settings); add gives each row `context` and `retrieved`."""

    def limit_input_length(self, splits: dict[str, list[dict]], tokenizer) -> None:
        """dataset.max_input_tokens: every row's text cut to that many of the model's tokens (dataset.truncation
        says which part is kept); data_counts gets how many rows of each part were cut."""
        cap, side = self.dataset.get("max_input_tokens"), self.dataset.get("truncation", "head")
        if tokenizer is None:  # a method without a tokenizer (e.g. a majority baseline) reads no tokens
            return
        cut = {}
        for name, rows in splits.items():
            texts, cut[name] = truncate_texts([row["text"] for row in rows], tokenizer, cap, side)
            for row, text in zip(rows, texts):
                row["text"] = text
        if cap is not None:
            self.data_counts["truncated"] = {"max_input_tokens": cap, "side": side, **cut}

    def test_metrics(self, predictions: list[dict]) -> dict:
        """The metrics of the run's final answers to the test split: metrics(), plus any judgement too costly to
        spend at every validation (Q&A: the LLM judge), and the metrics per slice (dataset.slice_column)."""
        slices = self.slice_metrics(predictions)
        return {**self.metrics(predictions), **({"slices": slices} if slices else {})}

    def fit_calibration(self, val_predictions: list[dict] | None) -> dict | None:
        """What calibrate() needs, fitted on the validation predictions (for metrics.json); None: nothing to fit."""
        return None

    def calibrate(self, predictions: list[dict], calibration: dict | None) -> list[dict]:
        """predictions with their confidences calibrated; as they are where there is nothing to calibrate."""
        return predictions

    def add_context(self, splits: dict[str, list[dict]], retriever_cfg: DictConfig, cache_dir: str | Path) -> dict:
        """rag=true: retrieved context in every row of every split (a training row never retrieves itself)."""
        add, settings = self.retriever(retriever_cfg, splits["train"], cache_dir)
        for name, rows in splits.items():
            add(rows, exclude_own=name == "train")
        return settings

    def retrieval_quality(self, rows: list[dict]) -> dict:
        """What the report says about how well retrieval found what rows needed (e.g. recall@k); {} if unknown."""
        return {}

    def figures(self, run_dir: Path, results: dict, tuned_name: str) -> list[str]:
        """PNG files written into run_dir for the report."""
        return []

    def report_detail(self, results: dict, records: list[dict], tuned_name: str) -> list[str]:
        """report.md lines after the base-vs-tuned table."""
        return []


def task_of(cfg: DictConfig, trust_remote_code: bool = False) -> Task:
    """The run's task from its config. Runs written before `task` was a config node name it in dataset.task."""
    from llmtune.tasks.classification import Classification
    from llmtune.tasks.qa import QuestionAnswering
    from llmtune.trust import instantiate_trusted

    if cfg.get("task") is not None:
        return instantiate_trusted(cfg.task, trust_remote_code, dataset=cfg.dataset)
    legacy = {"classification": Classification, "qa": QuestionAnswering}
    return legacy[cfg.dataset.get("task", "classification")](dataset=cfg.dataset)


def _natural_order(value: str) -> tuple:
    """Numbers before words, numbers by value: 50 < 66 < 100."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)
