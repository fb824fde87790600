"""What synth leaves in out/: the dataset file the `dataset` group reads as it is (qa.csv for dataset=synth_qa,
data.csv for dataset=synth_labels), with a train/validation/test `split` column, and the command that trains on it."""

import csv
import io
import random
import re
import shlex
from collections import defaultdict
from pathlib import Path

from llmtune.files import write_atomic
from llmtune.synth.rows import Row

# Words Hydra or OmegaConf read as something other than a string when bare.
HYDRA_WORDS = {"true", "false", "null", "none", "nan", "inf"}


def assign_splits(rows: list[Row], test_fraction: float, val_fraction: float, seed: int) -> None:
    """Set each row's split: test_fraction and val_fraction of the groups of each stratum (at least one test and one
    train group where there are two), drawn with the seed. The pairs of one chunk share a group, so a test question
    never has a sibling from its chunk in training. With a single group the rows themselves are drawn."""
    by_stratum = defaultdict(list)
    for row in rows:
        by_stratum[row.stratum].append(row)
    for stratum, members in by_stratum.items():
        groups = list(dict.fromkeys(row.group for row in members))
        grouped = len(groups) >= 2
        if not grouped:
            groups = [row.id for row in members]
        random.Random(f"{seed}-{stratum}").shuffle(groups)
        part_of = dict(zip(groups, _parts(len(groups), test_fraction, val_fraction)))
        for row in members:
            row.split = part_of[row.group if grouped else row.id]


def _parts(count: int, test_fraction: float, val_fraction: float) -> list[str]:
    tests = round(count * test_fraction)
    if count >= 2 and test_fraction > 0:
        tests = min(max(tests, 1), count - 1)
    validations = max(0, min(round(count * val_fraction), count - tests - 1))
    return ["test"] * tests + ["validation"] * validations + ["train"] * (count - tests - validations)


def split_counts(rows: list[Row]) -> dict[str, int]:
    return {part: sum(row.split == part for row in rows) for part in ("train", "validation", "test")}


def write_dataset(path: Path, columns: list[str], rows: list[Row]) -> None:
    """The dataset as CSV, written atomically (a kill never leaves half a file under its name)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        verdict = row.verdict or {}
        writer.writerow({"id": row.id, **row.fields, "split": row.split, "score": verdict.get("score"),
                         "reason": verdict.get("reason")})
    write_atomic(path, buffer.getvalue())


def hydra_value(text: str) -> str:
    """A string as a single-quoted Hydra override value: a quote escaped as \\', the backslashes right before a quote
    (or the closing one) doubled, and `${` escaped so OmegaConf keeps it literal instead of interpolating."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda run: run.group(1) * 2, text)
    return "'" + escaped.replace("'", "\\'").replace("${", "\\${") + "'"


def hydra_item(text: str) -> str:
    """A list element for a Hydra override: bare where Hydra reads it back as that very string (billing, .txt),
    quoted otherwise (numbers, true/null, spaces, punctuation)."""
    plain = re.fullmatch(r"[A-Za-z_][\w-]*|\.[A-Za-z0-9]+", text)
    return text if plain and text.lower() not in HYDRA_WORDS else hydra_value(text)


def train_command(kind: str, out: Path, documents: Path | None, document_types: tuple[str, ...],
                  labels: list[str] | None, instruction: str | None) -> str:
    """The command that trains on the dataset synth wrote, as one shell line."""
    out = out.resolve()
    if kind == "qa":
        overrides = ["dataset=synth_qa", f"dataset.path={out}"]
        if documents is not None:  # for rag=true: retrieve from the very documents the questions were written from
            overrides += [f"dataset.documents={documents.resolve()}",
                          "dataset.document_types=[" + ",".join(hydra_item(kind) for kind in document_types) + "]"]
    else:
        overrides = ["dataset=synth_labels", f"dataset.path={out / 'data.csv'}",
                     "dataset.labels=[" + ",".join(hydra_item(label) for label in labels) + "]",
                     f"dataset.instruction={hydra_value(instruction)}"]
    return "python -m llmtune " + " ".join(_shell_word(word) for word in overrides)


def _shell_word(word: str) -> str:
    """The word for a POSIX shell, quoted the most readable way that keeps it intact: bare, in single quotes, or
    (holding a Hydra-quoted value, e.g. 'it\\'s') in double quotes where nothing in it is special there."""
    if re.fullmatch(r"[\w@%+=:,./-]+", word):
        return word
    if "'" not in word:
        return f"'{word}'"
    if not re.search(r'["$`!]|\\\\', word):
        return f'"{word}"'
    return shlex.quote(word)
