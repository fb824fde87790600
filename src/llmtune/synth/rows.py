"""A generated row on its way to the dataset, and the judge's verdict on it: each kept row is graded 1-5 by the
endpoint (grounded in its chunk, or fits its label) and only rows scoring at least min_score stay (ReST-style
filtering of a teacher's output)."""

from dataclasses import dataclass, field

from llmtune.synth.work import WorkItem

JUDGE_SCHEMA = {
    "type": "object",
    # The reason comes first, so a model writing in order reasons before it scores.
    "properties": {"reason": {"type": "string"}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["reason", "score"],
    "additionalProperties": False,
}


@dataclass
class Row:
    id: str  # the work item that wrote it and its place in the reply, e.g. "qa/chunk-3/1"
    fields: dict  # the dataset file's columns for it (question, answer, doc, page; or text, label, doc, page)
    compared: str  # the text near-duplicates are looked for in (the question; the example text)
    group: str  # rows of one group always land in one split (the Q&A pairs of one chunk)
    stratum: str | None = None  # splits are drawn per stratum (the label)
    context: object = None  # what the judge needs besides the fields (the chunk)
    verdict: dict | None = field(default=None)  # {"score", "reason"} once judged
    split: str | None = None


def judge_item(row: Row, messages: list[dict]) -> WorkItem:
    return WorkItem(key=f"judge/{row.id}", messages=messages, schema=JUDGE_SCHEMA, schema_name="judgement",
                    stored=lambda reply: {"score": reply["score"], "reason": reply["reason"].strip()})


def passing(rows: list[Row], min_score: int) -> tuple[list[Row], dict]:
    """The rows scoring at least min_score, and the counts: judged, no verdict (no valid reply: left out, asked again
    on a rerun), below min_score, and how many got each score."""
    judged = [row for row in rows if row.verdict is not None]
    kept = [row for row in judged if row.verdict["score"] >= min_score]
    scores = {str(score): sum(row.verdict["score"] == score for row in judged) for score in range(1, 6)}
    return kept, {"judged": len(judged), "no_verdict": len(rows) - len(judged),
                  "below_min_score": len(judged) - len(kept), "scores": scores}
