"""Question/answer rows for document Q&A (task=qa): a CSV/JSONL of questions and reference answers, the
required answer tokens and the gold document and page where the dataset knows them; split at random with the seed."""

import ast
import random
from pathlib import Path

from omegaconf import DictConfig

from llmtune.data.loading import read_table
from llmtune.errors import UserError


def load_qa_rows(dataset_cfg: DictConfig, counts: dict | None = None) -> list[dict]:
    """Rows as {id, text (the question), answer, tokens (required in a correct answer), gold_source, gold_page}; counts,
    when given, gets rows_read and empty_text (rows without a question or an answer, after dataset.keep)."""
    path = str(dataset_cfg.qa_file)
    table = read_table(path, dataset_cfg)
    columns = {key: dataset_cfg[key] for key in ("question_column", "answer_column", "id_column", "tokens_column",
                                                  "source_column", "page_column")}
    missing = [f"{key}={name!r}" for key, name in columns.items() if name and name not in table.column_names]
    if missing:
        raise UserError(f"Q&A file {path} has no column for dataset.{', dataset.'.join(missing)} (it has "
                        f"{', '.join(table.column_names)}); set those keys to its column names, or null")
    keep = {column: set(values) for column, values in (dataset_cfg.get("keep") or {}).items()}
    rows, empty = [], 0
    for index, record in enumerate(table):
        if any(str(record.get(column)) not in values for column, values in keep.items()):
            continue
        question, answer = record[columns["question_column"]], record[columns["answer_column"]]
        if not question or not answer or not str(question).strip() or not str(answer).strip():
            empty += 1
            continue
        rows.append({
            "id": str(record[columns["id_column"]]) if columns["id_column"] else f"row-{index + 1}",
            "text": str(question).strip(),
            "answer": str(answer).strip(),
            "tokens": _token_list(record.get(columns["tokens_column"]), path, index),
            "gold_source": _cell(record, columns["source_column"]),
            "gold_page": _page(_cell(record, columns["page_column"])),
        })
    if counts is not None:
        counts.update(rows_read=len(table), empty_text=empty)
    if not rows:
        raise UserError(f"Q&A file {path} has no row with both a question and an answer (after dataset.keep); "
                        "check dataset.question_column, dataset.answer_column and dataset.keep")
    return rows


def split_rows(rows: list[dict], split_cfg: DictConfig, seed: int) -> dict[str, list[dict]]:
    """Shuffle with the seed; test first (so a different training budget never changes the test set), then train,
    then val. A size of null takes every row left."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    needed = sum(split_cfg[name] or 0 for name in ("test", "train", "val"))
    if needed > len(shuffled):
        raise UserError(f"the Q&A split asks for {needed} rows (dataset.split test + train + val) but the file has "
                        f"{len(shuffled)}; lower dataset.split.*")
    splits, start = {}, 0
    for name in ("test", "train", "val"):
        size = len(shuffled) - start if split_cfg[name] is None else split_cfg[name]
        splits[name], start = shuffled[start:start + size], start + size
    if not splits["train"] or not splits["test"]:
        raise UserError("the Q&A split left no training or no test rows; raise dataset.split.train / test")
    return splits


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
