"""Read a dataset's rows as the data has them: one table (CSV/TSV/JSON(L)/parquet), a table per split
(dataset.files), a `datasets` DatasetDict saved with save_to_disk, or a Hub dataset id (offline: from the HF cache).

Each row becomes {id, text, label (the label word), raw_label?, split?}; `split` is set where the data gives one
(a split column, a file or DatasetDict split per part). llmtune.data.splits turns the rows into train/val/test.
"""

import string
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig

from llmtune.data.labels import label_map, label_words, word_of
from llmtune.errors import UserError

LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PART_NAMES = ("train", "validation", "test")


def resource_path(name: str) -> str:
    """Path of a data file shipped inside the package (used by the ${llmtune_resource:...} resolver)."""
    return str(files("llmtune").joinpath("resources", name))


@dataclass
class Table:
    """One table of rows; part is its split ("train", "validation", "test") where the data gives it per table."""
    name: str  # the file or split, for messages
    rows: object  # a datasets.Dataset
    part: str | None = None


def read_source(dataset_cfg: DictConfig, path_key: str = "path") -> tuple[list[Table], str | None]:
    """The dataset's tables and how its split is given ("files", "saved DatasetDict", "Hub dataset", "split column";
    None: no split, the rows are one pool)."""
    given_files = dataset_cfg.get("files")
    split_cfg = dataset_cfg.get("split") or {}
    if given_files:
        tables = [Table(str(path), read_table(str(path), dataset_cfg), _part(name, "dataset.files"))
                  for name, path in given_files.items() if path is not None]
        return tables, "files"
    path = str(dataset_cfg[path_key])
    if Path(path).is_dir() and (Path(path) / "dataset_dict.json").is_file():
        import datasets

        return _named_parts(datasets.load_from_disk(path), split_cfg, path), "saved DatasetDict"
    if Path(path).is_dir() or (Path(path).suffix.lower() not in LOCAL_FORMATS and not Path(path).exists()):
        parts = _hub_dataset(path)  # a Hub id, or a folder of data files named by split (train.csv, test.csv)
        if set(parts) == {"train"}:  # a dataset without named splits: one pool
            return [Table(path, parts["train"])], None
        return _named_parts(parts, split_cfg, path), "Hub dataset"
    table = Table(path, read_table(path, dataset_cfg))
    return [table], ("split column" if split_cfg.get("column") else None)


def split_of(record: dict, split_cfg: DictConfig, table: Table, index: int) -> str | None:
    """The row's part: its table's, or the value of the split column mapped through dataset.split.names."""
    if table.part or not split_cfg.get("column"):
        return table.part
    value = str(record[split_cfg.column]).strip() if record[split_cfg.column] is not None else ""
    names = _split_names(split_cfg)
    if value not in names:
        raise UserError(f"row {index + 1} of {table.name} has {split_cfg.column}={value!r}, which is none of "
                        f"{', '.join(names)}; map it with dataset.split.names (e.g. dataset.split.names.validation="
                        f"{value or 'dev'}) or fix the row")
    return names[value]


def check_columns(table: Table, columns: dict[str, str | None], hint: str) -> None:
    """Every named column must be in the table: one line naming the missing ones and the table's columns."""
    have = table.rows.column_names
    missing = [f"{key}={name!r}" for key, name in columns.items() if name and name not in have]
    if missing:
        raise UserError(f"{table.name} has no column for {', '.join(missing)} (it has {', '.join(have)}); {hint}")
    if len(table.rows) == 0:
        raise UserError(f"{table.name} has no rows; point dataset.path (or dataset.files) at non-empty data")


def text_fields(dataset_cfg: DictConfig) -> tuple[str, list[str]]:
    """(template, the columns it reads): dataset.text_template over any columns, or the one text_column."""
    template = dataset_cfg.get("text_template")
    if not template:
        return "{" + str(dataset_cfg.text_column) + "}", [str(dataset_cfg.text_column)]
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise UserError(f"dataset.text_template={template!r} is not a valid template ({error}); write columns as "
                        "{column} and a literal brace as {{ or }}") from None
    if not fields or any(not field or "." in field or "[" in field for field in fields):
        raise UserError(f"dataset.text_template={template!r} must name columns as {{column}}, e.g. "
                        "'{title} — {description}'")
    return template, list(dict.fromkeys(fields))


def render_text(record: dict, template: str, fields: list[str]) -> str:
    """The row's text from the template; empty when every field it reads is empty."""
    values = {field: "" if record[field] is None else str(record[field]).strip() for field in fields}
    if not any(values.values()):
        return ""
    return template.format_map(values).strip()


def load_rows(dataset_cfg: DictConfig, counts: dict | None = None) -> tuple[list[dict], str | None]:
    """Labelled rows {id, text, label (word), raw_label, split} and how the split is given (see read_source); every
    problem with the data is one UserError line. counts, when given, gets rows_read and empty_text (rows skipped for
    having no text)."""
    template, fields = text_fields(dataset_cfg)
    words, mapping = label_words(dataset_cfg), label_map(dataset_cfg)
    split_cfg = dataset_cfg.get("split") or {}
    tables, given_by = read_source(dataset_cfg)
    rows, read = [], 0
    for table in tables:
        text_keys = ({f"dataset.text_template's {{{field}}}": field for field in fields}
                     if dataset_cfg.get("text_template") else {"dataset.text_column": fields[0]})
        check_columns(table, {**text_keys,
                              "dataset.label_column": dataset_cfg.label_column,
                              "dataset.id_column": dataset_cfg.id_column,
                              "dataset.slice_column": dataset_cfg.get("slice_column"),
                              "dataset.split.column": None if table.part else split_cfg.get("column")},
                      "set dataset.text_column (or text_template) / label_column / split.column to its column names, "
                      "and dataset.id_column to one or null (ids are then row-<line>)")
        for index, record in enumerate(table.rows):
            raw = record[dataset_cfg.label_column]
            word = word_of(raw, mapping) if raw is not None else None
            if word is None or word not in words:
                known = f"the keys of dataset.labels {list(mapping)}" if mapping else f"dataset.labels {words}"
                raise UserError(f"row {index + 1} of {table.name} has label {raw!r}, which is not in {known}; add "
                                "it to dataset.labels or remove those rows")
            part = split_of(record, split_cfg, table, index)
            text = render_text(record, template, fields)
            if not text:
                continue
            row_id = str(record[dataset_cfg.id_column]) if dataset_cfg.id_column else _row_id(table, index, len(tables))
            rows.append({"id": row_id, "text": text, "label": word, "raw_label": word_of(raw, None),
                         **({"split": part} if part else {}), **slice_of(record, dataset_cfg)})
        read += len(table.rows)
    if counts is not None:
        counts.update(rows_read=read, empty_text=read - len(rows))
    if not rows:
        raise UserError(f"{dataset_cfg.get('path')} has no row with text in {', '.join(fields)}")
    return rows, given_by


def slice_of(record: dict, dataset_cfg: DictConfig) -> dict:
    """{"slice": the row's value of dataset.slice_column} (an empty cell: "(empty)"); {} without that setting."""
    column = dataset_cfg.get("slice_column")
    if not column:
        return {}
    value = record[column]
    return {"slice": "(empty)" if value is None or str(value).strip() == "" else word_of(value, None)}


def read_table(path: str, dataset_cfg: DictConfig):
    """A local CSV/TSV/JSON(L)/parquet file as a datasets.Dataset; dataset_cfg gives the CSV encoding and column
    names."""
    import datasets

    datasets.disable_progress_bars()
    builder = LOCAL_FORMATS.get(Path(path).suffix.lower())
    if builder is None:
        raise UserError(f"{path} is not a .csv, .tsv, .json, .jsonl or .parquet file; convert it, or give a saved "
                        "DatasetDict folder or a Hub dataset id as dataset.path")
    if not Path(path).is_file():
        raise UserError(f"dataset file not found: {path}; set dataset.path (or dataset.files) to an existing file")
    if Path(path).stat().st_size == 0:
        raise UserError(f"dataset file {path} is empty (0 bytes); point dataset.path at a file with rows")
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


def _hub_dataset(name: str) -> dict:
    """Every split of a Hub dataset (usable only when online or in the HF cache) or of a local folder of data files
named by split."""
    import datasets

    datasets.disable_progress_bars()
    try:
        return dict(datasets.load_dataset(name))
    except Exception as error:  # datasets raises many types here; the message is what the user needs
        raise UserError(f"dataset.path={name} is neither a local .csv/.jsonl/.parquet file, a saved DatasetDict "
                        f"folder, nor a loadable Hub dataset ({type(error).__name__}); give a local path") from None


def _named_parts(parts, split_cfg: DictConfig, source: str) -> list[Table]:
    """The DatasetDict's splits named in dataset.split.names (other splits, e.g. IMDB's "unsupervised", are left
    out)."""
    names = _split_names(split_cfg)
    tables = [Table(f"{source} [{name}]", parts[name], part) for name, part in names.items() if name in parts]
    if not any(t.part == "train" for t in tables) or not any(t.part == "test" for t in tables):
        raise UserError(f"{source} has the splits {', '.join(parts)} but needs a train and a test split; name them "
                        "with dataset.split.names (e.g. dataset.split.names.test=validation)")
    return tables


def _split_names(split_cfg: DictConfig) -> dict[str, str]:
    """{the data's name for a part: part}, from dataset.split.names {part: the data's name}."""
    names = split_cfg.get("names") or {part: part for part in PART_NAMES}
    return {str(theirs): _part(part, "dataset.split.names") for part, theirs in names.items() if theirs is not None}


def _part(name: str, key: str) -> str:
    part = {"val": "validation", "dev": "validation"}.get(str(name), str(name))
    if part not in PART_NAMES:
        raise UserError(f"{key} has a part {name!r}; the parts are train, validation and test")
    return part


def _row_id(table: Table, index: int, tables: int) -> str:
    return f"row-{index + 1}" if tables == 1 else f"{table.part}-{index + 1}"
