"""Question/answer rows for document Q&A (task=qa): a CSV/JSONL of questions and reference answers, the
required answer tokens and the gold document and page where the dataset knows them; split as the data gives it, or
at random with the seed (llmtune.data.splits)."""

import ast
from pathlib import Path

from omegaconf import DictConfig

from llmtune.data.loading import check_columns, read_source, slice_of, split_of
from llmtune.errors import UserError


def load_qa_rows(dataset_cfg: DictConfig, counts: dict | None = None) -> tuple[list[dict], str | None]:
    """Rows as {id, text (the question), answer, tokens (required in a correct answer), gold_source, gold_page,
    split?} and how the data gives its split (llmtune.data.loading.read_source); counts, when given, gets rows_read
    and empty_text (rows without a question or an answer, after dataset.keep)."""
    tables, given_by = read_source(dataset_cfg, "qa_file")
    split_cfg = dataset_cfg.get("split") or {}
    columns = {key: dataset_cfg.get(key) for key in ("question_column", "answer_column", "id_column", "tokens_column",
                                                      "source_column", "page_column", "slice_column")}
    keep = {column: set(values) for column, values in (dataset_cfg.get("keep") or {}).items()}
    rows, empty, read = [], 0, 0
    for table in tables:
        check_columns(table, {f"dataset.{key}": name for key, name in columns.items()},
                      "set those keys to its column names, or null")
        for index, record in enumerate(table.rows):
            if any(str(record.get(column)) not in values for column, values in keep.items()):
                continue
            question, answer = record[columns["question_column"]], record[columns["answer_column"]]
            if not question or not answer or not str(question).strip() or not str(answer).strip():
                empty += 1
                continue
            part = split_of(record, split_cfg, table, index)
            rows.append({
                "id": str(record[columns["id_column"]]) if columns["id_column"] else f"row-{index + 1}",
                "text": str(question).strip(),
                "answer": str(answer).strip(),
                "tokens": _token_list(record.get(columns["tokens_column"]), table.name, index),
                "gold_source": _cell(record, columns["source_column"]),
                "gold_page": _page(_cell(record, columns["page_column"])),
                **({"split": part} if part else {}), **slice_of(record, dataset_cfg),
            })
        read += len(table.rows)
    if counts is not None:
        counts.update(rows_read=read, empty_text=empty)
    if not rows:
        raise UserError(f"Q&A file {dataset_cfg.qa_file} has no row with both a question and an answer (after "
                        "dataset.keep); check dataset.question_column, dataset.answer_column and dataset.keep")
    return rows, given_by


def _cell(record: dict, column: str | None) -> str | None:
    value = record.get(column) if column else None
    return str(value).strip() if value is not None and str(value).strip() else None


def _page(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def _token_list(value, path: str, index: int) -> list[str]:
    """Required answer tokens, written as a JSON or Python list of strings ("['3 months']"); empty when absent."""
    if value is None or not str(value).strip():
        return []
    try:
        tokens = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        tokens = None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"row {index + 1} of {Path(path).name}: the required-tokens cell {str(value)[:60]!r} is not a "
                        "list of strings like [\"3 months\"]; fix the cell or set dataset.tokens_column=null")
    return tokens
