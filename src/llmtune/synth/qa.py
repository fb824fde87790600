"""`llmtune synth qa`: question-answer pairs grounded in document chunks. One work item per chunk asks for per_chunk
pairs; each row keeps its question, answer, source document and page, and the judge grades it against its chunk."""

from llmtune.rag.documents import Chunk
from llmtune.synth.prompts import PromptFile
from llmtune.synth.rows import Row, judge_item
from llmtune.synth.work import WorkItem

QA_SCHEMA = {
    "type": "object",
    "properties": {"pairs": {"type": "array", "minItems": 1, "items": {
        "type": "object",
        "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["question", "answer"],
        "additionalProperties": False}}},
    "required": ["pairs"],
    "additionalProperties": False,
}
COLUMNS = ["id", "question", "answer", "doc", "page", "split", "score", "reason"]


def page_text(chunk: Chunk) -> str:
    return str(chunk.page) if chunk.page is not None else "unknown"


class QaSynth:
    name = "qa"
    dataset_file = "qa.csv"
    columns = COLUMNS
    FILLS = {"count", "source", "page", "text"}  # the placeholders its prompts may use
    JUDGE_FILLS = {"source", "page", "text", "question", "answer"}

    def __init__(self, chunks: list[Chunk], per_chunk: int, prompt: PromptFile, judge_prompt: PromptFile):
        self.chunks, self.per_chunk = chunks, per_chunk
        self.prompt, self.judge_prompt = prompt, judge_prompt

    def settings(self) -> dict:
        """What the rows depend on beyond the documents and prompts (a resumed out= must match it)."""
        return {"per_chunk": self.per_chunk}

    def rows_requested(self) -> int:
        return len(self.chunks) * self.per_chunk

    def generation_items(self) -> list[WorkItem]:
        return [WorkItem(key=self._key(index), schema=QA_SCHEMA, schema_name="qa_pairs", stored=self._stored,
                         messages=self.prompt.messages(count=self.per_chunk, source=chunk.source,
                                                       page=page_text(chunk), text=chunk.text))
                for index, chunk in enumerate(self.chunks)]

    def _stored(self, reply: dict) -> dict:
        """The reply's pairs, blank ones dropped (counted) and any beyond per_chunk cut."""
        pairs = [{"question": pair["question"].strip(), "answer": pair["answer"].strip()} for pair in reply["pairs"]]
        filled = [pair for pair in pairs if pair["question"] and pair["answer"]]
        return {"rows": filled[:self.per_chunk], "blank": len(pairs) - len(filled)}

    def rows(self, done: dict) -> list[Row]:
        """Every answered chunk's pairs, in the order of the chunks."""
        rows = []
        for index, chunk in enumerate(self.chunks):
            key = self._key(index)
            for number, pair in enumerate(done.get(key, {}).get("rows", [])):
                rows.append(Row(id=f"{key}/{number}", compared=pair["question"], group=key, context=chunk,
                                fields={**pair, "doc": chunk.source, "page": chunk.page}))
        return rows

    def judge_item(self, row: Row) -> WorkItem:
        chunk = row.context
        return judge_item(row, self.judge_prompt.messages(source=chunk.source, page=page_text(chunk), text=chunk.text,
                                                          question=row.fields["question"],
                                                          answer=row.fields["answer"]))

    @staticmethod
    def _key(index: int) -> str:
        return f"qa/chunk-{index}"
