"""Question answering over documents: a generated answer per question, judged against the reference answer (and,
with eval.judge.url set, graded by an LLM judge: llmtune.evaluation.judge)."""

from omegaconf import DictConfig, OmegaConf

from llmtune.data.prompts import PromptFormat
from llmtune.data.qa import load_qa_rows
from llmtune.data.splits import make_splits
from llmtune.evaluation.generation import answer_questions, qa_metrics
from llmtune.evaluation.judge import METRICS as JUDGE_METRICS, AnswerJudge
from llmtune.rag.context import document_retriever, recall_at_k
from llmtune import run_outputs
from llmtune.tasks.base import Task


class QuestionAnswering(Task):
    name = "qa"
    headline = "rougeL"
    # The judge's rows show only where a model was judged (run_outputs leaves out a metric no model has).
    report_metrics = ("bleu", "rouge1", "rouge2", "rougeL", "ngram_similarity", "token_presence", *JUDGE_METRICS)
    slice_metric = "bleu"
    answer_ends_with_eos = True  # a generated answer must learn to stop

    def __init__(self, dataset: DictConfig, judge: DictConfig | None = None):
        """judge: eval.judge (conf/task/qa.yaml passes it); None or no url: no judge."""
        super().__init__(dataset)
        settings = OmegaConf.to_container(judge, resolve=True) if isinstance(judge, DictConfig) else judge
        self.judge = AnswerJudge(settings) if settings and settings.get("url") else None

    def load_splits(self, seed: int) -> dict[str, list[dict]]:
        rows, given_by = load_qa_rows(self.dataset, self.data_counts)
        # duplicates=drop: the same question in train and test would flatter the test score
        return make_splits(rows, self.dataset.split, seed, None, "answer", self.dataset.duplicates == "drop",
                           self.data_counts, given_by)

    def target(self, row: dict) -> str:
        return row["answer"]

    def lm_predictions(self, model, tokenizer, rows, prompt_format: PromptFormat, eval_cfg: DictConfig, desc: str):
        return answer_questions(model, tokenizer, rows, prompt_format, eval_cfg.generation, eval_cfg.batch_size, desc)

    def metrics(self, predictions: list[dict]) -> dict:
        return qa_metrics(predictions)

    def test_metrics(self, predictions: list[dict]) -> dict:
        """metrics(), and the judge's scores (eval.judge), each judged prediction getting its verdict. Validation
        answers are never judged: they are scored at every validation."""
        metrics = super().test_metrics(predictions)
        graded = self.judge.grade(predictions) if self.judge else None
        if graded:
            metrics["intervals"].update(graded.pop("intervals"))
            metrics.update(graded)
        return metrics

    def retriever(self, retriever_cfg, train, cache_dir):
        """The document chunks nearest each question (the training rows are not the corpus)."""
        add, settings = document_retriever(retriever_cfg, self.dataset, cache_dir)
        return (lambda rows, exclude_own=False: add(rows)), settings

    def retrieval_quality(self, rows: list[dict]) -> dict:
        return recall_at_k(rows)

    def report_detail(self, results: dict, records: list[dict], tuned_name: str) -> list[str]:
        return [*run_outputs.slice_detail(results, self.dataset.get("slice_column"), self, tuned_name),
                *run_outputs.answer_examples(records, tuned_name)]
