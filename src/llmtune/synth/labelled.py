"""`llmtune synth labelled`: example texts for each label of a classification task, per_label of each. A label's
examples are asked for per_request at a time (one work item each); with documents, each request draws its subject
matter from a different chunk (chosen with the seed), without them the instruction alone describes the task. The
judge grades how well each text fits its label."""

import math
import random

from llmtune.rag.documents import Chunk
from llmtune.synth.prompts import PromptFile
from llmtune.synth.rows import Row, judge_item
from llmtune.synth.work import WorkItem

EXAMPLES_SCHEMA = {
    "type": "object",
    "properties": {"examples": {"type": "array", "minItems": 1, "items": {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
        "additionalProperties": False}}},
    "required": ["examples"],
    "additionalProperties": False,
}
COLUMNS = ["id", "text", "label", "doc", "page", "split", "score", "reason"]


class LabelledSynth:
    name = "labelled"
    dataset_file = "data.csv"
    columns = COLUMNS
    FILLS = {"instruction", "labels", "label", "count", "batch", "batches"}  # the placeholders its prompts may use
    DOCUMENT_FILLS = {"source", "text"}  # and those of user_with_document
    JUDGE_FILLS = {"instruction", "labels", "label", "text"}

    def __init__(self, labels: list[str], instruction: str, per_label: int, per_request: int,
                 chunks: list[Chunk] | None, seed: int, prompt: PromptFile, judge_prompt: PromptFile):
        self.labels, self.instruction = labels, instruction
        self.per_label, self.per_request = per_label, per_request
        self.chunks, self.seed, self.prompt, self.judge_prompt = chunks, seed, prompt, judge_prompt
        self.batches = math.ceil(per_label / per_request)
        # Which chunk each request draws on: a seeded order, walked so consecutive requests of a label (and the
        # labels of one batch) use different chunks.
        self.chunk_order = random.Random(seed).sample(range(len(chunks)), len(chunks)) if chunks else []

    def settings(self) -> dict:
        """What the rows depend on beyond the documents and prompts (the seed picks each request's chunk)."""
        return {"labels": self.labels, "instruction": self.instruction, "per_label": self.per_label,
                "per_request": self.per_request, **({"seed": self.seed} if self.chunks else {})}

    def rows_requested(self) -> int:
        return len(self.labels) * self.per_label

    def generation_items(self) -> list[WorkItem]:
        return [self._item(label_index, batch) for label_index in range(len(self.labels))
                for batch in range(self.batches)]

    def _item(self, label_index: int, batch: int) -> WorkItem:
        label = self.labels[label_index]
        count = min(self.per_request, self.per_label - batch * self.per_request)
        values = {"instruction": self.instruction, "labels": ", ".join(self.labels), "label": label, "count": count,
                  "batch": batch + 1, "batches": self.batches}
        chunk = self._chunk(label_index, batch)
        if chunk is None:
            messages = self.prompt.messages(**values)
        else:
            messages = self.prompt.messages("user_with_document", source=chunk.source, text=chunk.text, **values)

        def stored(reply: dict) -> dict:
            texts = [example["text"].strip() for example in reply["examples"]]
            filled = [text for text in texts if text]
            return {"label": label, "rows": [{"text": text} for text in filled[:count]],
                    "blank": len(texts) - len(filled)}

        return WorkItem(key=self._key(label, batch), messages=messages, schema=EXAMPLES_SCHEMA,
                        schema_name="labelled_examples", stored=stored)

    def _chunk(self, label_index: int, batch: int) -> Chunk | None:
        if not self.chunks:
            return None
        return self.chunks[self.chunk_order[(batch * len(self.labels) + label_index) % len(self.chunks)]]

    def rows(self, done: dict) -> list[Row]:
        """Every answered request's examples, label by label, in the order of the requests."""
        rows = []
        for label_index, label in enumerate(self.labels):
            for batch in range(self.batches):
                key, chunk = self._key(label, batch), self._chunk(label_index, batch)
                for number, example in enumerate(done.get(key, {}).get("rows", [])):
                    row_id = f"{key}/{number}"
                    rows.append(Row(id=row_id, compared=example["text"], group=row_id, stratum=label, fields={
                        "text": example["text"], "label": label, "doc": chunk.source if chunk else None,
                        "page": chunk.page if chunk else None}))
        return rows

    def judge_item(self, row: Row) -> WorkItem:
        return judge_item(row, self.judge_prompt.messages(instruction=self.instruction, labels=", ".join(self.labels),
                                                          label=row.fields["label"], text=row.fields["text"]))

    @staticmethod
    def _key(label: str, batch: int) -> str:
        return f"labelled/{label}/{batch}"
