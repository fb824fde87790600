"""`llmtune synth qa|labelled documents=DIR out=DIR url=http://HOST:PORT/v1 [model=NAME] [key=value ...]`.

A teacher model behind any OpenAI-compatible endpoint writes a dataset: Q&A pairs grounded in document chunks (qa),
or example texts for a label set (labelled). Replies are asked for in a JSON schema and checked on receipt;
near-duplicates are dropped; the endpoint then grades each row as judge (1-5) and rows below min_score are left out.
Every answered request is logged in out/progress.jsonl as it arrives, so a rerun with the same out= continues
where the last one stopped and never asks for an answered item again. out/ ends with the dataset (qa.csv or
data.csv, with a train/validation/test split column) and provenance.json (endpoint, model, prompts, seed, options,
counts, token tally; the API key's variable name, never the key).
"""

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from llmtune.cli import option, parse, positional
from llmtune.console import clock
from llmtune.endpoint import Endpoint, EndpointSettings
from llmtune.errors import UserError
from llmtune.files import write_atomic
from llmtune.rag.documents import content_hash, load_chunks
from llmtune.synth.dedup import near_duplicates
from llmtune.synth.folder import SynthFolder, check_out_folder
from llmtune.synth.labelled import LabelledSynth
from llmtune.synth.output import assign_splits, split_counts, train_command, write_dataset
from llmtune.synth.prompts import load_prompt
from llmtune.synth.qa import QaSynth
from llmtune.synth.rows import passing
from llmtune.synth.work import PhaseCounts, public_url, run_phase

PROVENANCE_FILE = "provenance.json"
JUDGE_MAX_TOKENS = 256  # a one-sentence reason and a score


@dataclass(frozen=True)
class SynthArgs:
    """Write a training dataset with a teacher model behind any OpenAI-compatible endpoint (vLLM, llama.cpp server,
    Ollama, a hosted API, llmtune serve): Q&A pairs grounded in your documents (qa), or labelled example texts for a
    label set (labelled). Near-duplicates are dropped, every row is graded by the endpoint as judge, and a rerun with
    the same out= continues an interrupted run without asking for anything twice."""

    kind: Literal["qa", "labelled"] = positional("qa: question-answer pairs from documents; labelled: example "
                                                 "texts per label", metavar="qa|labelled")
    out: Path = option(help="the folder to write (new or empty, or an earlier synth's to continue it)",
                       metavar="DIR")
    url: str = option(help="the API's base URL, e.g. http://127.0.0.1:8000/v1", metavar="URL")
    documents: Path | None = option(None, "a folder of .txt/.md/.pdf files (qa: required; labelled: grounds the "
                                          "examples in its chunks)", metavar="DIR", default_text="none")
    model: str | None = option(None, "the teacher model's name at the endpoint", metavar="NAME",
                               default_text="the first model the endpoint lists")
    labels: str | None = option(None, "labelled: the label set, comma-separated", metavar="A,B,...")
    instruction: str | None = option(None, "labelled: the task and what each label means", metavar="TEXT")
    per_chunk: int = option(3, "qa: question-answer pairs asked for per chunk", minimum=1)
    per_label: int = option(50, "labelled: examples asked for per label", minimum=1)
    per_request: int = option(5, "labelled: examples asked for in one request", minimum=1)
    chunk_size: int = option(200, "words per document chunk", minimum=1)
    chunk_overlap: int = option(20, "words shared by consecutive chunks", minimum=0)
    max_chunks: int = option(0, "draw this many of the chunks (with seed=), e.g. to try a teacher before paying for "
                                "every chunk", minimum=0, range_text="at least 0; 0: every chunk")
    document_types: str = option(".txt,.md,.pdf", "the file kinds read from documents= (a folder holding a PDF and "
                                                  "its extracted text: give one kind)", metavar=".EXT,...")
    min_score: int = option(4, "keep rows the judge scores at least this (1-5)", minimum=0, maximum=5,
                            range_text="0 to 5; 0: no judge pass")
    dedup_threshold: float = option(0.7, "drop a row whose word-bigram Jaccard similarity to an earlier one is at "
                                         "least this", minimum=0.0, maximum=1.0,
                                    range_text="0 to 1; 0: keep near-duplicates")
    test_fraction: float = option(0.2, "share of the rows (Q&A: of the chunks) in the test split", minimum=0.0,
                                  maximum=0.9)
    val_fraction: float = option(0.1, "share in the validation split", minimum=0.0, maximum=0.5)
    seed: int = option(42, "seeds the split and which chunk each labelled request draws on")
    concurrency: int = option(4, "requests in flight at once", minimum=1, maximum=256)
    timeout_s: float = option(120.0, "seconds per request before it is retried", minimum=0.001)
    max_retries: int = option(4, "retries of a failed request (connection, timeout, 429, 5xx), with backoff",
                              minimum=0)
    attempts: int = option(3, "requests per item until a reply matches the JSON schema", minimum=1)
    temperature: float = option(0.7, "the teacher's sampling temperature (the judge uses 0)", minimum=0.0,
                                maximum=2.0)
    max_tokens: int = option(1024, "the most tokens one reply may have", minimum=1)
    api_key_env: str = option("OPENAI_API_KEY", "the environment variable holding the API key (unset: no key, for "
                                                "local servers)", metavar="NAME")
    usd_per_million_input_tokens: float = option(0.0, "price, for the cost tally", minimum=0.0)
    usd_per_million_output_tokens: float = option(0.0, "price, for the cost tally", minimum=0.0)
    prompts: Path | None = option(None, "a folder of prompt files replacing the shipped ones of the same name "
                                        "(qa.yaml, labelled.yaml, judge_qa.yaml, judge_labelled.yaml)",
                                  metavar="DIR", default_text="conf/synth")


def main(argv: list[str]) -> None:
    args = parse(SynthArgs, argv, "synth")
    started = time.monotonic()
    check_options(args)
    check_out_folder(args.out)
    chunks = read_documents(args)
    kind = build_kind(args, chunks)
    endpoint = endpoint_settings(args)
    teacher = Endpoint(endpoint)
    model = teacher.check()  # an unreachable endpoint is one line here, before any work
    # The judge grades deterministically (temperature 0), and its reply is short.
    judge = Endpoint(replace(endpoint, model=model, temperature=0.0,
                             max_tokens=min(endpoint.max_tokens, JUDGE_MAX_TOKENS)))
    recorded = run_settings(args, kind, chunks, model)
    folder = SynthFolder(args.out, recorded)  # a changed configuration on a rerun is refused here
    synth = Synthesis(args, kind, folder, teacher, judge, recorded)
    try:
        synth.run()
    except UserError as error:
        # The counts of a stopped run are kept, unless an earlier run's dataset is there: provenance.json always
        # describes the dataset beside it.
        if not (args.out / kind.dataset_file).exists():
            synth.write_provenance(time.monotonic() - started, status=f"stopped: {error}")
        raise
    finally:
        folder.close()
    synth.write_provenance(time.monotonic() - started, status="complete")
    synth.print_summary(time.monotonic() - started, chunks)


def check_options(args: SynthArgs) -> None:
    """Every mistake in the options, before any file is read or request sent."""
    if not args.url.startswith(("http://", "https://")):
        raise UserError(f"url={args.url} is not an http(s) URL; give the API's base URL, e.g. "
                        "url=http://127.0.0.1:8000/v1")
    if args.chunk_overlap >= args.chunk_size:
        raise UserError(f"chunk_overlap={args.chunk_overlap} must be smaller than chunk_size={args.chunk_size}")
    if args.kind == "qa":
        if args.documents is None:
            raise UserError("llmtune synth qa needs documents=DIR: a folder of .txt/.md/.pdf files to write "
                            "questions about")
        for name in ("labels", "instruction"):
            if getattr(args, name) is not None:
                raise UserError(f"{name}= is for llmtune synth labelled; synth qa writes questions about "
                                "documents= and takes no label set")
        return
    labels = label_list(args.labels)
    if len(labels) < 2:
        given = f"labels={args.labels} names {len(labels)} label" if args.labels else "no labels= given"
        raise UserError(f"{given}; a classifier needs at least two, e.g. labels=positive,negative,neutral")
    if not args.instruction or not args.instruction.strip():
        raise UserError("llmtune synth labelled needs instruction=TEXT: the task and what each label means, e.g. "
                        "instruction='Sentiment of a customer review: positive, negative or neutral'")


def label_list(text: str | None) -> list[str]:
    """labels=a,b,c as a list; a label named twice is an error (it would double its class)."""
    labels = [label.strip() for label in (text or "").split(",") if label.strip()]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"labels={text} names {', '.join(repeated)} more than once; give each label once")
    return labels


def read_documents(args: SynthArgs) -> list | None:
    """The documents' chunks (None where labelled runs without documents); an empty or missing folder is one line."""
    if args.documents is None:
        return None
    types = document_types(args)
    if not args.documents.is_dir():
        raise UserError(f"documents={args.documents} is not a folder; give the folder holding the {', '.join(types)} "
                        "files")
    if not any(path.is_file() and path.suffix.lower() in types for path in args.documents.rglob("*")):
        raise UserError(f"documents={args.documents} has no {', '.join(types)} files; add some, or point documents= "
                        "at the folder that holds them (document_types= sets the kinds read)")
    chunks = load_chunks(args.documents, args.chunk_size, args.chunk_overlap, types)
    if 0 < args.max_chunks < len(chunks):  # a seeded draw, kept in document order
        drawn = sorted(random.Random(args.seed).sample(range(len(chunks)), args.max_chunks))
        chunks = [chunks[index] for index in drawn]
    return chunks


def document_types(args: SynthArgs) -> tuple[str, ...]:
    """document_types=.txt,md as (".txt", ".md")."""
    kinds = (kind.strip().lower() for kind in args.document_types.split(","))
    return tuple(kind if kind.startswith(".") else f".{kind}" for kind in kinds if kind)


def build_kind(args: SynthArgs, chunks: list | None) -> QaSynth | LabelledSynth:
    folder = args.prompts
    if folder is not None and not folder.is_dir():
        raise UserError(f"prompts={folder} is not a folder; give a folder of prompt files like conf/synth")
    if args.kind == "qa":
        return QaSynth(chunks, args.per_chunk, load_prompt("qa", QaSynth.FILLS, folder),
                       load_prompt("judge_qa", QaSynth.JUDGE_FILLS, folder))
    if chunks:  # each request draws on a chunk: the prompt's user_with_document text
        prompt = load_prompt("labelled", LabelledSynth.FILLS | LabelledSynth.DOCUMENT_FILLS, folder,
                             "user_with_document")
    else:
        prompt = load_prompt("labelled", LabelledSynth.FILLS, folder)
    return LabelledSynth(label_list(args.labels), args.instruction.strip(), args.per_label, args.per_request, chunks,
                         args.seed, prompt, load_prompt("judge_labelled", LabelledSynth.JUDGE_FILLS, folder))


def endpoint_settings(args: SynthArgs) -> EndpointSettings:
    return EndpointSettings(
        url=args.url, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
        timeout_s=args.timeout_s, max_retries=args.max_retries, attempts=args.attempts,
        temperature=args.temperature, max_tokens=args.max_tokens,
        usd_per_million_input_tokens=args.usd_per_million_input_tokens,
        usd_per_million_output_tokens=args.usd_per_million_output_tokens)


def run_settings(args: SynthArgs, kind, chunks: list | None, model: str) -> dict:
    """What the rows depend on: a rerun with the same out= must match it (synth.json). The endpoint's URL, the
    concurrency, timeouts, retries, temperature and max_tokens (a rerun may ask invalid items again with more),
    min_score, the dedup threshold and the split fractions may change between runs."""
    documents = None if chunks is None else {
        "content_sha256": content_hash(chunks), "chunks": len(chunks), "chunk_size": args.chunk_size,
        "chunk_overlap": args.chunk_overlap}
    return {"kind": args.kind, "documents": documents, "model": model, **kind.settings(),
            "prompts": {prompt.name: prompt.fingerprint() for prompt in (kind.prompt, kind.judge_prompt)}}


class Synthesis:
    """One run: generate what is missing, drop near-duplicates, judge what is left, write the dataset."""

    def __init__(self, args: SynthArgs, kind, folder: SynthFolder, teacher: Endpoint, judge: Endpoint,
                 settings: dict):
        self.args, self.kind, self.folder, self.teacher, self.judge = args, kind, folder, teacher, judge
        self.settings = settings
        self.generation = PhaseCounts()
        self.judging: PhaseCounts | None = None  # None: no judge pass (min_score=0), or not reached
        self.counts: dict = {}
        self.kept: list = []

    def run(self) -> None:
        run_phase(self.teacher, self.kind.generation_items(), self.folder, f"synth {self.kind.name}: generating",
                  self.generation)
        rows = self.kind.rows(self.folder.done)
        unique = self.without_near_duplicates(rows)
        kept = self.judged(unique)
        self.counts.update(rows_valid=len(rows), kept=len(kept))
        if self.kind.name == "labelled":
            self.counts["kept_per_label"] = {label: sum(row.stratum == label for row in kept)
                                             for label in self.kind.labels}
        if not kept:
            raise UserError(self.nothing_kept_message(rows, unique))
        assign_splits(kept, self.args.test_fraction, self.args.val_fraction, self.args.seed)
        self.kept = kept
        write_dataset(self.args.out / self.kind.dataset_file, self.kind.columns, kept)

    def without_near_duplicates(self, rows: list) -> list:
        threshold = self.args.dedup_threshold
        repeats = near_duplicates([row.compared for row in rows], threshold) if threshold > 0 else [None] * len(rows)
        unique = [row for row, repeat in zip(rows, repeats) if repeat is None]
        self.counts["duplicates_dropped"] = len(rows) - len(unique)
        return unique

    def judged(self, rows: list) -> list:
        """The rows scoring at least min_score (all of them with min_score=0: no judge pass)."""
        if self.args.min_score == 0:
            return rows
        items = [self.kind.judge_item(row) for row in rows]
        self.judging = PhaseCounts()
        run_phase(self.judge, items, self.folder, f"synth {self.kind.name}: judging", self.judging)
        for row, item in zip(rows, items):
            row.verdict = self.folder.done.get(item.key)
        kept, counts = passing(rows, self.args.min_score)
        self.counts.update(counts)
        return kept

    def nothing_kept_message(self, rows: list, unique: list) -> str:
        if not rows:
            return (f"no valid row was generated ({self.generation.invalid} items got no reply matching the schema, "
                    f"{self.generation.failed} failed); see {PROVENANCE_FILE} in out={self.args.out}")
        return (f"no row scored at least min_score={self.args.min_score} (judge scores: {self.counts['scores']}, "
                f"{self.counts.get('no_verdict', 0)} without a verdict) of {len(unique)} rows; lower min_score= and "
                "rerun the same command (nothing is asked again), or read the reasons in progress.jsonl")

    def all_counts(self) -> dict:
        done = self.folder.done
        generated = [done[item.key] for item in self.kind.generation_items() if item.key in done]
        return {"work_items": self.generation.items, "rows_requested": self.kind.rows_requested(),
                "rows_blank": sum(value.get("blank", 0) for value in generated),
                "generation": self.generation.public(), "judge": self.judging.public() if self.judging else None,
                **self.counts}

    def write_provenance(self, seconds: float, status: str) -> None:
        args = self.args
        settings = {**self.teacher.settings.public(), "url": public_url(args.url), "model": self.teacher.model}
        record = {
            "command": "llmtune synth", "kind": args.kind, "status": status,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "endpoint": settings, "judge": {"temperature": self.judge.settings.temperature,
                                            "max_tokens": self.judge.settings.max_tokens,
                                            "min_score": args.min_score},
            "prompts": {prompt.name: prompt.record() for prompt in (self.kind.prompt, self.kind.judge_prompt)},
            "seed": args.seed,
            "options": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(args).items()
                        if key != "url"},
            "documents": str(args.documents.resolve()) if args.documents else None,
            "settings": self.settings,  # what a rerun with this out= must match (synth.json)
            "counts": self.all_counts(),
            "splits": split_counts(self.kept),
            "wall_s": round(seconds, 1),
            "tally": {"teacher": self.teacher.tally.summary(self.teacher.settings),
                      "judge": self.judge.tally.summary(self.judge.settings)},
            "dataset": self.kind.dataset_file if status == "complete" else None,
            "train_command": self.train_command() if status == "complete" else None,
        }
        write_atomic(args.out / PROVENANCE_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")

    def train_command(self) -> str:
        return train_command(self.args.kind, self.args.out, self.args.documents, document_types(self.args),
                             getattr(self.kind, "labels", None), getattr(self.kind, "instruction", None))

    def print_summary(self, seconds: float, chunks: list | None) -> None:
        generation, counts, out = self.generation, self.counts, self.args.out
        source = f" from {len(chunks)} chunks" if chunks else ""
        lines = [f"llmtune synth {self.kind.name}: {generation.items} work items{source} ({generation.asked} asked "
                 f"now, {generation.done_before} answered earlier); rows requested {self.kind.rows_requested()}, "
                 f"valid {counts['rows_valid']}, duplicates dropped {counts['duplicates_dropped']}"]
        if self.judging:
            lines.append(f"judge: {counts['judged']} rows graded, scores {counts['scores']}; {counts['kept']} kept "
                         f"(score >= {self.args.min_score}), {counts['below_min_score']} below, "
                         f"{counts['no_verdict']} without a verdict")
        lines += self.unanswered_lines() + self.tally_lines() + self.shortfall_lines()
        splits = split_counts(self.kept)
        if not splits["train"] or not splits["test"]:
            lines.append(f"warning: {counts['kept']} rows are too few for both a train and a test split; ask for "
                         "more (per_chunk=, per_label=, more documents) with a new out=")
        lines += [f"wrote {out / self.kind.dataset_file} ({counts['kept']} rows: {splits['train']} train, "
                  f"{splits['validation']} validation, {splits['test']} test) and {out / PROVENANCE_FILE} in "
                  f"{clock(seconds)}",
                  "train on it:", f"  {self.train_command()}"]
        print("\n".join(lines), flush=True)

    def unanswered_lines(self) -> list[str]:
        phases = [phase for phase in (self.generation, self.judging) if phase is not None]
        unanswered = sum(phase.invalid + phase.failed for phase in phases)
        if not unanswered:
            return []
        example = next(error for phase in phases for error in phase.errors)
        return [f"{unanswered} items got no valid reply (e.g. {example}); rerun the same command to ask them again"]

    def tally_lines(self) -> list[str]:
        lines = []
        for name, endpoint in (("teacher", self.teacher), ("judge", self.judge)):
            tally = endpoint.tally.summary(endpoint.settings)
            if tally["requests"] or tally["failed_requests"]:
                lines.append(f"{name}: {tally['requests']} requests, {tally['failed_requests']} failed, "
                             f"{tally['invalid_replies']} invalid replies, {tally['prompt_tokens']:,} prompt + "
                             f"{tally['completion_tokens']:,} completion tokens, ${tally['cost_usd']:.4f}")
        return lines

    def shortfall_lines(self) -> list[str]:
        """labelled: the labels left with fewer rows than per_label (judged out, duplicates, invalid replies)."""
        if self.args.kind != "labelled":
            return []
        short = {label: n for label, n in self.counts["kept_per_label"].items() if n < self.args.per_label}
        if not short:
            return []
        return [f"short of per_label={self.args.per_label}: " + ", ".join(f"{label} {n}" for label, n in short.items())
                + " (a new out= with a larger per_label asks for more)"]
