"""A Task and a Method that live outside llmtune, as a user's would: the run picks them up from YAML alone."""

from collections import Counter

from llmtune.data.loading import read_table
from llmtune.evaluation.metrics import classification_metrics
from llmtune.evaluation.scoring import classify
from llmtune.methods import Method
from llmtune.tasks import Task


class LengthBucket(Task):
    """Is a sentence short or long? Labels are derived from the text itself (word count against a threshold)."""

    name = "length_bucket"
    headline = "accuracy"
    report_metrics = ("accuracy", "macro_f1")
    answer_ends_with_eos = False

    def __init__(self, dataset, threshold: int = 12):
        super().__init__(dataset)
        self.threshold = threshold

    @property
    def labels(self):
        return ["short", "long"]

    def load_splits(self, seed):
        table = read_table(str(self.dataset.path), self.dataset)
        rows = [{"id": str(i), "text": r[self.dataset.text_column],
                 "label": "short" if len(r[self.dataset.text_column].split()) < self.threshold else "long"}
                for i, r in enumerate(table)]
        return {"train": rows[:40], "val": rows[40:50], "test": rows[50:80]}

    def target(self, row):
        return row["label"]

    def lm_predictions(self, model, tokenizer, rows, prompt_format, eval_cfg, desc):
        return classify(model, tokenizer, rows, prompt_format, self.labels, eval_cfg.batch_size, desc)

    def metrics(self, predictions):
        return classification_metrics([p["predicted"] for p in predictions], [p["gold"] for p in predictions],
                                      self.labels)

    def retriever(self, retriever_cfg, train, cache_dir):
        raise NotImplementedError("length_bucket has no retrieval")


class MajorityLabel(Method):
    """Answers every row with the training split's most common label: no model at all."""

    def __init__(self, name: str):
        super().__init__(name)
        self.answer = None

    def build(self, model_cfg, task, model_dir):
        self.labels = task.labels

    def prompt_format(self, zero_shot, task, splits, seed):
        self.answer = Counter(task.target(r) for r in splits["train"]).most_common(1)[0][0]
        return zero_shot

    def base_predictions(self, task, rows, zero_shot, eval_cfg):
        return None

    def predictions(self, task, rows, prompt_format, eval_cfg, desc):
        return [{"id": r["id"], "text": r["text"], "gold": task.target(r), "predicted": self.answer,
                 "scores": {label: float(label == self.answer) for label in self.labels}} for r in rows]
