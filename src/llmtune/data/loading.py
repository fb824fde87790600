"""Load labelled rows from a local file (or a Hub dataset id) and split them per class, stratified and seeded."""

import random
from collections import defaultdict
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig

from llmtune.errors import UserError

LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def resource_path(name: str) -> str:
    """Path of a data file shipped inside the package (used by the ${llmtune_resource:...} resolver)."""
    return str(files("llmtune").joinpath("resources", name))


def load_rows(dataset_cfg: DictConfig, counts: dict | None = None) -> list[dict]:
    """Rows as {id, text, label}; every problem with the file is reported as one UserError line. counts, when given,
    gets rows_read and empty_text (rows skipped for having no text)."""
    table = read_table(str(dataset_cfg.path), dataset_cfg)
    text_col, label_col, id_col = dataset_cfg.text_column, dataset_cfg.label_column, dataset_cfg.id_column
    missing = [c for c in (text_col, label_col, id_col) if c and c not in table.column_names]
    if missing:
        raise UserError(f"dataset file {dataset_cfg.path} has no column {', '.join(map(repr, missing))} "
                        f"(it has {', '.join(table.column_names)}); set dataset.text_column / "
                        "dataset.label_column / dataset.id_column")
    if len(table) == 0:
        raise UserError(f"dataset file {dataset_cfg.path} has no rows; point dataset.path at a non-empty file")

    labels = list(dataset_cfg.labels)
    rows = []
    for index, record in enumerate(table):
        text, label = record[text_col], str(record[label_col]).strip()
        if label not in labels:
            raise UserError(f"dataset row {index + 1} of {dataset_cfg.path} has label {label!r}, which is not in "
                            f"dataset.labels {labels}; add it to dataset.labels or remove those rows")
        if text is None or not str(text).strip():
            continue
        row_id = str(record[id_col]) if id_col else f"row-{index + 1}"
        rows.append({"id": row_id, "text": str(text).strip(), "label": label})
    if counts is not None:
        counts.update(rows_read=len(table), empty_text=len(table) - len(rows))
    if not rows:
        raise UserError(f"dataset file {dataset_cfg.path} has no row with text in column {text_col!r}")
    return rows


def read_table(path: str, dataset_cfg: DictConfig):
    """A local CSV/TSV/JSON(L)/parquet file (or a Hub dataset id) as a datasets.Dataset; dataset_cfg gives the CSV
    encoding and column names."""
    import datasets

    datasets.disable_progress_bars()
    builder = LOCAL_FORMATS.get(Path(path).suffix.lower())
    if builder is None:  # not a file name: a Hub dataset id, usable only when online or cached
        try:
            return datasets.load_dataset(path, split="train")
        except Exception as error:  # datasets raises many types here; the message is what the user needs
            raise UserError(f"dataset.path={path} is neither a local .csv/.jsonl/.parquet file nor a loadable Hub "
                            f"dataset ({type(error).__name__}); give a local file path") from None
    if not Path(path).is_file():
        raise UserError(f"dataset file not found: {path}; set dataset.path to an existing file")
    options = {}
    if builder == "csv":
        options = {"encoding": dataset_cfg.encoding, "sep": "\t" if path.endswith(".tsv") else ","}
        if dataset_cfg.column_names:
            options["column_names"] = list(dataset_cfg.column_names)
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", **options)
    except Exception as error:
        if "corresponds to no data" in str(error):  # how datasets reports a header-only file
            raise UserError(f"dataset file {path} has no rows; point dataset.path at a non-empty file") from None
        raise UserError(f"could not read {path} as {builder}: {str(error).splitlines()[0][:200]}; "
                        "check the file format and dataset.encoding") from None


def drop_duplicates(rows: list[dict], answer_key: str, counts: dict) -> list[dict]:
    """The first row of each text (case and spacing ignored), so no text can land in two splits; counts gets
    duplicates_removed and conflicting_answers (texts that came with more than one label or answer)."""
    first: dict[str, dict] = {}
    conflicting = set()
    for row in rows:
        key = " ".join(row["text"].lower().split())
        if key in first and first[key][answer_key] != row[answer_key]:
            conflicting.add(key)
        first.setdefault(key, row)
    counts.update(duplicates_removed=len(rows) - len(first), conflicting_answers=len(conflicting))
    return list(first.values())


def split_per_class(rows: list[dict], labels: list[str], split_cfg: DictConfig, seed: int) -> dict[str, list[dict]]:
    """Per label: shuffle (seeded), take test_per_class, then train_per_class, then up to val_per_class of the rest.

    Test is drawn first so changing the training budget never changes the test set.
    A per-class count of null means "all remaining rows of that class".
    """
    by_label = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    for label in labels:
        pool = by_label[label]
        rng.shuffle(pool)
        test_n, train_n = split_cfg.test_per_class, split_cfg.train_per_class
        needed = (test_n or 0) + (train_n or 0)
        if len(pool) < needed or not pool:
            raise UserError(f"label {label!r} has {len(pool)} rows but the split asks for {needed} "
                            f"(test_per_class + train_per_class); lower dataset.split.* or use a larger file")
        test_n = len(pool) if test_n is None else test_n
        splits["test"] += pool[:test_n]
        train_end = len(pool) if train_n is None else test_n + train_n
        splits["train"] += pool[test_n:train_end]
        val_n = split_cfg.val_per_class or 0
        splits["val"] += pool[train_end:train_end + val_n]
    for name in splits:  # interleave the labels; the training loader shuffles again each epoch
        rng.shuffle(splits[name])
    if not splits["train"] or not splits["test"]:
        raise UserError("the split left no training or no test rows; raise dataset.split.train_per_class / "
                        "test_per_class")
    return splits
