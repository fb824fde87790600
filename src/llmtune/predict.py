"""`llmtune predict RUN_DIR input=FILE|- [output=jsonl|csv|json] [out=FILE|-] [model=PATH] [batch_size=N]`.

Reads a CSV (a `text` column, or the run's dataset.text_column) or JSONL (objects with that key, or bare strings),
classifies every row with the run's model (its adapter, or an exported folder/GGUF with model=PATH) and writes one
record per row: jsonl/csv give the label, its confidence and every label's probability; json gives the structured
form {"<label_name>": label, "confidence": p, "reasoning": "..."}, checked against a JSON schema. Where
dataset.labels maps raw values to words ({0: negative, ...}), each record also carries the word's raw value
(`raw_label`; for json beside the structured object). A classification-head run (method=classifier) predicts with its
head, as its evaluation did. A Q&A run reads
questions (dataset.question_column) and writes each generated answer, with the retrieved sources for rag=true. Bad
rows are reported with their line numbers and skipped, never silently.
"""

import csv
import hashlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import jsonschema

from llmtune.cli import Quantize, option, parse, positional, quantize_choice
from llmtune.data.labels import label_map, raw_label_of
from llmtune.data.loading import render_text, text_fields
from llmtune.errors import UserError
from llmtune.files import same_file, write_atomic

Output = Literal["jsonl", "csv", "json"]
SHOWN_BAD_ROWS = 10  # bad rows listed one per line on stderr; the rest are counted


@dataclass(frozen=True)
class PredictArgs:
    """Predict every row of a CSV or JSONL file (or stdin) with a finished run's model: a label with its
    confidence per row for a classification run, an answer per question for a Q&A run."""

    run_dir: Path = positional("a finished run's folder (its name may hold '=', e.g. ...-rag=False)",
                               metavar="RUN_DIR")
    input: str = option(help="a .csv or .jsonl file, or - for stdin", metavar="FILE|-")
    output: Output = option("jsonl", "jsonl/csv: label, confidence, every label's probability; json: the "
                                     "structured form, checked against a JSON schema")
    out: str | None = option(None, "where to write, or - for stdout", metavar="FILE|-",
                             default_text="RUN_DIR/predict/<input name>-<hash>.<ext>; stdout for input=-")
    model: str | None = option(None, "an exported folder or .gguf to predict with", metavar="PATH",
                               default_text="the run's own adapter")
    batch_size: int = option(0, "rows per batch", minimum=0,
                             range_text="at least 1, or 0 for the run's eval.batch_size")
    text_column: str | None = option(None, "the column (CSV) or key (JSONL) holding the text", metavar="NAME",
                                     default_text="the run's dataset.text_column, or question_column for Q&A")
    overwrite: bool = option(False, "replace an existing out=FILE")
    trust_remote_code: bool = option(False, "load a run whose config asks for remote code or names its own model.path")
    quantize: Quantize | None = option(None, "int8: the decoder's linear layers in int8 (CPU); none: the model's dtype",
                                       default_text="the run's eval.quantize")


def main(argv: list[str]) -> None:
    args = parse(PredictArgs, argv, "predict")
    run_dir, options = args.run_dir, asdict(args)
    out = output_path(run_dir, options)  # checked before the model loads
    source, text = _read_input(options["input"])
    from llmtune.inference import load_run, run_config  # torch and transformers: only once the arguments are good
    from llmtune.tasks import task_of
    from llmtune.trust import check_run_is_trusted

    # The input's rows are checked against the run's config before its model loads.
    cfg = run_config(run_dir)
    check_run_is_trusted(cfg, run_dir, options["trust_remote_code"])
    qa = task_of(cfg, options["trust_remote_code"]).labels is None  # Q&A answers questions; classification labels
    if qa and options["output"] == "json":
        raise UserError(f"{run_dir} is a Q&A run: output=json is the structured form of a classification; use "
                        "output=jsonl or output=csv for its answers")
    dataset = cfg.dataset
    column = text_source(dataset, options["text_column"], qa)
    rows, bad = parse_rows(text, source, column)
    _report_bad_rows(bad, source)
    if not rows:
        raise UserError(f"{source} has no usable rows (0 of {len(bad)}): each row needs a non-empty "
                        f"'{column.name}'; set text_column=NAME if the text is in another column")
    loaded = load_run(run_dir, options["model"], trust_remote_code=options["trust_remote_code"],
                      quantize=quantize_choice(options["quantize"], cfg))

    started = time.perf_counter()
    texts, batch_size = [r["text"] for r in rows], options["batch_size"] or None
    if qa:
        records = [{**_kept(row), "text": row["text"], **answer}
                   for row, answer in zip(rows, loaded.answer(texts, batch_size, desc="answering"))]
    else:
        label_name, mapping = dataset.get("label_name") or "label", label_map(dataset)
        records = [_record(row, p, options["output"], label_name, mapping)
                   for row, p in zip(rows, loaded.classify(texts, batch_size, desc="predicting"))]
    seconds = time.perf_counter() - started
    summary = f"predicted {len(records)} rows in {seconds:.1f} s ({len(records) / seconds:.1f} rows/s)"
    if options["output"] == "json":
        valid = validate_structured(records, structured_schema(label_name, loaded.labels))
        summary += f"; JSON schema valid: {valid}/{len(records)} ({valid / len(records):.1%})"

    body = _to_csv(records) if options["output"] == "csv" else "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if out == "-":
        sys.stdout.write(body)
    else:
        write_atomic(out, body)
        summary += f" -> {out}"
    print(f"[llmtune] {summary}; skipped {len(bad)} bad rows", file=sys.stderr)


def output_path(run_dir: Path, options: dict) -> Path | str:
    """out=FILE, or "-" for stdout; by default RUN_DIR/predict/<input name>-<hash of its full path>.<ext>, so two
    inputs of one name in different folders never share an output. An existing file is replaced only with
    overwrite=true, and never the input itself."""
    name, out = options["input"], options["out"]
    if out == "-" or (out is None and name == "-"):
        return "-"
    if out is None:
        digest = hashlib.sha256(str(Path(name).resolve()).encode("utf-8")).hexdigest()[:8]
        out = run_dir / "predict" / f"{Path(name).stem}-{digest}.{_ext(options['output'])}"
    out = Path(out)
    if out.is_dir():
        example = out / f"predictions.{_ext(options['output'])}"
        raise UserError(f"out={out} is a folder: give a file name, e.g. out={example}")
    if name != "-" and same_file(out, name):
        raise UserError(f"out={out} is the input file: give another file name for the predictions")
    if out.exists() and not options["overwrite"]:
        raise UserError(f"out={out} already exists: pass overwrite=true to replace it, or give another out=FILE")
    return out


def _read_input(name: str) -> tuple[Path, str]:
    if name == "-":
        return Path("stdin"), sys.stdin.read()
    path = Path(name)
    if not path.is_file():
        raise UserError(f"input={name} does not exist: pass a .csv or .jsonl file, or input=- for stdin")
    try:
        return path, path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"input={name} is not UTF-8 text (byte {error.start}): re-save it as UTF-8") from None


@dataclass(frozen=True)
class TextSource:
    """Where an input row's text is: one column, or the run's dataset.text_template over several."""
    fields: tuple[str, ...]
    template: str | None = None

    @property
    def name(self) -> str:
        return self.template or self.fields[0]

    def read(self, record: dict):
        if self.template is None:
            return record.get(self.fields[0])
        if not all(field in record for field in self.fields):
            return None
        return render_text(record, self.template, list(self.fields))


def text_source(dataset, text_column: str | None, qa: bool) -> TextSource:
    """text_column=NAME, else the run's text_template (its rows were built from several columns), else its
    dataset.text_column (question_column for Q&A)."""
    if text_column is None and not qa and dataset.get("text_template"):
        template, fields = text_fields(dataset)
        return TextSource(tuple(fields), template)
    return TextSource((text_column or dataset.get("question_column" if qa else "text_column") or "text",))


def parse_rows(text: str, source: Path, column: "str | TextSource") -> tuple[list[dict], list[tuple[int, str]]]:
    """Rows {line, text (, id)} and bad rows (line number, why). JSONL when the file says so by its name or its
    first character, else CSV with a header."""
    column = TextSource((column,)) if isinstance(column, str) else column
    first = text.lstrip()[:1]
    if source.suffix in (".jsonl", ".json") or (source.suffix != ".csv" and first in ("{", '"')):
        return _jsonl_rows(text, column)
    return _csv_rows(text, column)


def _jsonl_rows(text: str, column: TextSource):
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            bad.append((number, f"not valid JSON ({error.msg})"))
            continue
        if isinstance(value, str):  # a bare string per line
            _keep(rows, bad, number, value, None)
        elif isinstance(value, dict) and isinstance(text := column.read(value), str):
            _keep(rows, bad, number, text, value.get("id"))
        else:
            bad.append((number, f"neither a string nor an object with a string {_quoted(column.fields)} field"))
    return rows, bad


def _csv_rows(text: str, column: TextSource):
    reader = csv.DictReader(io.StringIO(text))
    missing = [field for field in column.fields if field not in (reader.fieldnames or [])]
    if missing:
        uses = f"the run's text template {column.template!r} reads" if column.template else "set text_column=NAME"
        raise UserError(f"the CSV header has no {_quoted(missing)} column (it has "
                        f"{reader.fieldnames or 'none'}): {uses}" + (" them" if column.template else ""))
    rows, bad = [], []
    for record in reader:
        number = reader.line_num  # the file's line where this record ends (a quoted text may span lines)
        if None in record:  # more fields than the header
            bad.append((number, f"{len(reader.fieldnames) + len(record[None])} fields, the header has "
                                f"{len(reader.fieldnames)}"))
            continue
        _keep(rows, bad, number, column.read(record), record.get("id"))
    return rows, bad


def _quoted(names) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _keep(rows: list, bad: list, number: int, text: str | None, row_id) -> None:
    if text is None or not text.strip():
        bad.append((number, "empty text"))
        return
    rows.append({"line": number, "text": text, **({"id": row_id} if row_id not in (None, "") else {})})


def _report_bad_rows(bad: list[tuple[int, str]], source: Path) -> None:
    for number, why in bad[:SHOWN_BAD_ROWS]:
        print(f"[llmtune] skipped {source.name} line {number}: {why}", file=sys.stderr)
    if len(bad) > SHOWN_BAD_ROWS:
        print(f"[llmtune] ... and {len(bad) - SHOWN_BAD_ROWS} more bad rows", file=sys.stderr)


def structured_schema(label_name: str, labels: list[str]) -> dict:
    """The sentiment article's output object: the label, its confidence and a short reasoning."""
    return {"type": "object", "additionalProperties": False, "required": [label_name, "confidence", "reasoning"],
            "properties": {label_name: {"enum": labels}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                           "reasoning": {"type": "string", "minLength": 1}}}


def validate_structured(records: list[dict], schema: dict) -> int:
    """How many records the schema accepts (records carry line/id outside the structured object)."""
    validator = jsonschema.Draft202012Validator(schema)
    return sum(validator.is_valid(record["output"]) for record in records)


def _kept(row: dict) -> dict:
    """Where the record came from: its line in the input file, and its id when the input has one."""
    return {k: row[k] for k in ("line", "id") if k in row}


def _record(row: dict, prediction: dict, output: str, label_name: str, mapping: dict[str, str] | None = None
            ) -> dict:
    """One output record for a classified row; mapping (dataset.labels {raw value: word}) adds the raw value."""
    keep = _kept(row)
    raw = {"raw_label": raw_label_of(prediction["label"], mapping)} if mapping is not None else {}
    if output == "json":
        # Label scoring reads no free-text explanation from the model (generating one would cost ~0.4 s per token
        # here); the reasoning states what the decision rests on: the label probabilities.
        ranked = sorted(prediction["scores"].items(), key=lambda kv: -kv[1])
        reasoning = "label probabilities: " + ", ".join(f"{label} {p:.2f}" for label, p in ranked)
        return {**keep, "output": {label_name: prediction["label"], "confidence": prediction["confidence"],
                                   "reasoning": reasoning}, **raw}
    return {**keep, "text": row["text"], "label": prediction["label"], **raw, "confidence": prediction["confidence"],
            "scores": prediction["scores"]}


def _to_csv(records: list[dict]) -> str:
    """One row per record; a classification's label probabilities as p_<label> columns, a Q&A's sources joined."""
    scores = list(records[0].get("scores", {}))
    label = ["label", "raw_label", "confidence"] if "raw_label" in records[0] else ["label", "confidence"]
    fields = ["line", "id", "text", *(label if scores else ["answer"])]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(fields + [f"p_{label}" for label in scores] + (["sources"] if "sources" in records[0] else []))
    for r in records:
        writer.writerow([r.get(f, "") for f in fields] + [r["scores"][label] for label in scores]
                        + (["; ".join(r["sources"])] if "sources" in r else []))
    return buffer.getvalue()


def _ext(output: str) -> str:
    return "csv" if output == "csv" else "jsonl"
