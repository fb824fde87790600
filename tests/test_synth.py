"""`llmtune synth`: over a real HTTP round trip on loopback, against a deterministic OpenAI-compatible teacher (a small
FastAPI app in this file, whose faults are scripted per request) and against `llmtune serve` of the tiny run."""

import asyncio
import csv
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import compose_config, serving, wait_until
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llmtune.config import build_components
from llmtune.errors import report_user_errors
from llmtune.synth.cli import main as synth_main
from llmtune.synth.dedup import near_duplicates
from llmtune.synth.folder import PROGRESS_FILE, SynthFolder

REPO = Path(__file__).resolve().parents[1]
MODEL = "teacher-1"
WORDS = ("harbour lantern meadow copper violet glacier orchard saddle thimble falcon quarry ember walnut pylon "
         "tundra mosaic ribbon anchor cobalt juniper basalt cinder fjord gable heron ivory jasper kelp lagoon marble "
         "nectar onyx pebble quill rustic sable tallow umber velvet willow yarrow zephyr amber birch cedar delta"
         ).split()


@contextmanager
def serving_api(app):
    """app on a loopback port: yields its /v1 base URL."""
    with serving(app) as base_url:
        yield f"{base_url}/v1"


def judge_score(text: str) -> int:
    """The teacher's judge score for a question or an example text: fixed by its hash, so a test knows it."""
    return 1 + int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5


class Teacher:
    """A deterministic teacher. Every request is logged as (item, schema, what happened); `faults` scripts what the
    next requests whose prompt holds a marker get: "429", "500", "malformed", "off-schema", "slow" (answered after
    `slow_s`), each used once; `block_after` answered generation requests, later ones wait until `released`."""

    def __init__(self, slow_s: float = 1.0, block_after: int | None = None):
        self.log: list[tuple[str, str, str]] = []
        self.keys: set[str] = set()  # the API keys the requests carried
        self.in_flight = self.most_in_flight = 0
        self.faults: dict[str, list[str]] = {}
        self.slow_s, self.block_after = slow_s, block_after
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.app = self._app()

    def answered(self, schema: str | None = None) -> list[str]:
        return [item for item, name, what in self.log if what == "answered" and schema in (None, name)]

    def _fault(self, prompt: str) -> str | None:
        with self.lock:
            for marker, faults in self.faults.items():
                if marker in prompt and faults:
                    return faults.pop(0)
        return None

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "test"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            self.in_flight += 1  # one event loop: no lock needed
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                return await answer(request)
            finally:
                self.in_flight -= 1

        async def answer(request: Request):
            body = await request.json()
            self.keys.add(request.headers.get("authorization", ""))
            prompt = body["messages"][-1]["content"]
            schema = body["response_format"]["json_schema"]["name"]
            item = hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()[:16]
            fault = self._fault(prompt)
            if schema != "judgement" and self.block_after is not None and len(self.answered()) >= self.block_after:
                self.log.append((item, schema, "blocked"))
                while not self.released.is_set():
                    await asyncio.sleep(0.02)
            self.log.append((item, schema, fault or "answered"))
            if fault == "429":
                return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, status_code=429,
                                    headers={"retry-after-ms": "20"})
            if fault == "500":
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
            if fault == "slow":
                await asyncio.sleep(self.slow_s)
            content = {"malformed": '{"pairs": [{"question": "cut sh', "off-schema": '{"rows": []}'}.get(
                fault) or json.dumps(reply(schema, prompt))
            return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": MODEL,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()),
                              "total_tokens": len(prompt.split()) + len(content.split())}}

        return app


def reply(schema: str, prompt: str) -> dict:
    """What the teacher answers: pairs built from the chunk's words, example texts built from the label and the
    batch, a judgement whose score judge_score fixes."""
    if schema == "judgement":
        graded = re.search(r"Question: (.*)", prompt) or re.search(r"Text: (.*)\Z", prompt, re.DOTALL)
        return {"reason": "as scripted", "score": judge_score(graded.group(1).strip())}
    count = int(re.search(r"Write (\d+) different", prompt).group(1))
    if schema == "qa_pairs":
        words = prompt.split("Text:", 1)[1].split()
        return {"pairs": [{"question": f"What does it say about {' '.join(words[3 * i:3 * i + 3])}?",
                           "answer": f"It says {' '.join(words[3 * i:3 * i + 6])}."} for i in range(count)]}
    label = re.search(r'correct label is "([^"]+)"', prompt).group(1)
    batch = int(re.search(r"batch (\d+) of", prompt).group(1))
    texts = []
    for number in range(count):
        seed = int(hashlib.sha256(f"{label}/{batch}/{number}".encode()).hexdigest(), 16)
        texts.append(" ".join(WORDS[(seed >> (6 * k)) % len(WORDS)] for k in range(8)) + f" ({label})")
    return {"examples": [{"text": text} for text in texts]}


@pytest.fixture
def teacher():
    teacher = Teacher()
    with serving_api(teacher.app) as url:
        teacher.url = url
        yield teacher
        teacher.released.set()


@pytest.fixture
def docs(tmp_path) -> Path:
    """Three documents of 60 distinct words: with chunk_size=30, two chunks each."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for number, name in enumerate(["leave.txt", "travel.md", "security.txt"]):
        words = [f"{WORDS[(number * 17 + i) % len(WORDS)]}{i}" for i in range(60)]
        (folder / name).write_text(" ".join(words) + "\n", encoding="utf-8")
    return folder


def synth(capsys, *args: str) -> tuple[int, str, str]:
    """`llmtune synth ARGS` in this process, as __main__ runs it: (exit status, stdout, stderr)."""
    try:
        report_user_errors(synth_main)([str(arg) for arg in args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def qa_args(teacher, docs: Path, out: Path, *extra: str) -> list[str]:
    return ["qa", f"documents={docs}", f"out={out}", f"url={teacher.url}", "chunk_size=30", "chunk_overlap=0",
            "per_chunk=2", "timeout_s=5", "max_retries=2", *extra]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def error_line(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("llmtune: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_qa_writes_a_dataset_that_a_run_loads(teacher, docs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-test-secret-4242")
    out = tmp_path / "out"
    code, stdout, err = synth(capsys, *qa_args(teacher, docs, out, "min_score=0", "api_key_env=TEACHER_KEY"))
    assert code == 0, err
    assert teacher.keys == {"Bearer sk-test-secret-4242"}  # sent, and written nowhere
    assert not any("sk-test-secret" in path.read_text() for path in out.iterdir()) and "sk-test" not in stdout + err
    rows = read_csv(out / "qa.csv")
    assert len(rows) == 12 and {row["doc"] for row in rows} == {"leave.txt", "travel.md", "security.txt"}
    assert all(row["question"].startswith("What does it say about") and row["answer"] for row in rows)
    assert Counter(row["split"] for row in rows) == {"train": 8, "test": 2, "validation": 2}  # whole chunks
    chunks_of = {part: {row["id"].rsplit("/", 1)[0] for row in rows if row["split"] == part} for part in
                 ("train", "test")}
    assert not chunks_of["train"] & chunks_of["test"]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["status"] == "complete" and provenance["endpoint"]["model"] == MODEL
    assert provenance["endpoint"]["api_key_env"] == "TEACHER_KEY"
    assert provenance["prompts"]["qa"]["version"] and "$text" in provenance["prompts"]["qa"]["user"]
    assert provenance["counts"]["generation"] == {"items": 6, "done_before": 0, "asked": 6, "valid": 6,
                                                  "invalid": 0, "failed": 0}
    assert provenance["tally"]["teacher"]["requests"] == 6 and provenance["tally"]["judge"]["requests"] == 0
    assert provenance["counts"]["rows_requested"] == 12 and provenance["counts"]["kept"] == 12

    # The printed command trains on it: composed from the real conf/, its rows load and split as written.
    command = next(line.strip() for line in stdout.splitlines() if line.strip().startswith("python -m llmtune"))
    overrides = shlex.split(command)[3:]
    assert overrides[:2] == ["dataset=synth_qa", f"dataset.path={out.resolve()}"]
    task, _ = build_components(compose_config(["model=tiny", *overrides], output_dir=tmp_path / "run"))
    splits = task.load_splits(seed=1)
    assert {name: len(part) for name, part in splits.items()} == {"train": 8, "val": 2, "test": 2}
    assert {row["gold_source"] for row in splits["train"] + splits["test"]} <= {"leave.txt", "travel.md",
                                                                                "security.txt"}


def test_max_chunks_asks_about_a_seeded_draw_of_the_chunks(teacher, docs, tmp_path, capsys):
    drawn = {}
    for seed in (1, 2):
        out = tmp_path / f"out{seed}"
        code, _, err = synth(capsys, *qa_args(teacher, docs, out, "min_score=0", "max_chunks=2", f"seed={seed}"))
        assert code == 0, err
        rows = read_csv(out / "qa.csv")
        drawn[seed] = {row["question"] for row in rows}
        assert len(rows) == 4 and len({row["id"].rsplit("/", 1)[0] for row in rows}) == 2  # 2 of 6 chunks, 2 pairs
    assert len(teacher.log) == 4 and drawn[1] != drawn[2]
    rerun = synth(capsys, *qa_args(teacher, docs, tmp_path / "out1", "min_score=0", "max_chunks=2", "seed=1"))
    assert rerun[0] == 0 and len(teacher.log) == 4  # the same draw: nothing asked again


def test_labelled_with_the_judge_keeps_what_scores_high_enough(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = synth(capsys, "labelled", f"out={out}", f"url={teacher.url}", "labels=billing, outage",
                              "instruction=Support tickets: it's billing, or an outage",
                              "per_label=7", "per_request=3", "min_score=3")
    assert code == 0, err
    generated = {label: [] for label in ("billing", "outage")}
    for item, schema, _ in teacher.log:
        assert schema in ("labelled_examples", "judgement")
    assert len(teacher.answered("labelled_examples")) == 6  # 3 requests per label: 3 + 3 + 1
    rows = read_csv(out / "data.csv")
    provenance = json.loads((out / "provenance.json").read_text())
    for label in generated:
        for batch, count in enumerate((3, 3, 1), start=1):
            generated[label] += reply("labelled_examples", f'Write {count} different texts whose correct label is '
                                                           f'"{label}". This is batch {batch} of 3')["examples"]
    expected = [(e["text"], label) for label, examples in generated.items() for e in examples
                if judge_score(e["text"]) >= 3]
    assert [(row["text"], row["label"]) for row in rows] == expected
    assert all(int(row["score"]) == judge_score(row["text"]) for row in rows)
    counts = provenance["counts"]
    assert counts["judged"] == 14 and counts["kept"] == len(expected)
    assert counts["below_min_score"] == 14 - len(expected) and sum(counts["scores"].values()) == 14
    assert len(teacher.answered("judgement")) == 14

    command = next(line.strip() for line in stdout.splitlines() if line.strip().startswith("python -m llmtune"))
    overrides = shlex.split(command)[3:]
    cfg = compose_config(["model=tiny", *overrides], output_dir=tmp_path / "run")
    assert list(cfg.dataset.labels) == ["billing", "outage"]
    assert cfg.dataset.instruction == "Support tickets: it's billing, or an outage"
    task, _ = build_components(cfg)
    assert sum(len(part) for part in task.load_splits(seed=1).values()) == len(expected)


def test_labelled_examples_grounded_in_document_chunks(teacher, docs, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = synth(capsys, "labelled", f"documents={docs}", f"out={out}", f"url={teacher.url}",
                              "labels=urgent,routine", "instruction=Triage of internal requests", "per_label=4",
                              "per_request=2", "chunk_size=30", "chunk_overlap=0", "min_score=0")
    assert code == 0, err
    rows = read_csv(out / "data.csv")
    assert Counter(row["label"] for row in rows) == {"urgent": 4, "routine": 4}
    # 4 requests, each on its own chunk of the 6 (seeded), named in its rows
    chunks = {(row["id"].rsplit("/", 1)[0], row["doc"]) for row in rows}
    assert len(chunks) == 4 and {doc for _, doc in chunks} <= {"leave.txt", "travel.md", "security.txt"}
    assert json.loads((out / "synth.json").read_text())["seed"] == 42


def test_retries_on_429_500_and_a_timeout_and_counts_invalid_replies(teacher, docs, tmp_path, capsys):
    teacher.faults = {"leave": ["429", "500"], "travel": ["slow"], "security": ["malformed", "off-schema"] * 3}
    teacher.slow_s = 1.5
    out = tmp_path / "out"
    code, stdout, err = synth(capsys, *qa_args(teacher, docs, out, "min_score=0", "timeout_s=0.5",
                                               "concurrency=3"))
    assert code == 0, err
    counts = json.loads((out / "provenance.json").read_text())["counts"]["generation"]
    # leave.txt's chunks: the 429 and the 500 are retried by the client; travel.md's slow reply times out and is
    # asked again; security.txt's two chunks get malformed or off-schema replies on all their 3 attempts.
    assert counts == {"items": 6, "done_before": 0, "asked": 6, "valid": 4, "invalid": 2, "failed": 0}
    tally = json.loads((out / "provenance.json").read_text())["tally"]["teacher"]
    assert tally["invalid_replies"] == 6 and tally["failed_requests"] == 0
    assert {row["doc"] for row in read_csv(out / "qa.csv")} == {"leave.txt", "travel.md"}
    assert "2 items got no valid reply" in stdout and "rerun the same command" in stdout
    whats = Counter(what for _, _, what in teacher.log)
    assert whats["429"] == 1 and whats["500"] == 1 and whats["slow"] == 1
    assert 1 <= teacher.most_in_flight <= 3  # concurrency=3

    # The rerun asks only the two unanswered items again, and now gets them.
    before = len(teacher.log)
    code, stdout, err = synth(capsys, *qa_args(teacher, docs, out, "min_score=0"))
    assert code == 0, err
    assert len(teacher.log) - before == 2 and len(read_csv(out / "qa.csv")) == 12


def test_near_duplicates_are_dropped(teacher, docs, tmp_path, capsys):
    (docs / "z-leave-again.txt").write_text((docs / "leave.txt").read_text())  # the same questions again
    out = tmp_path / "out"
    code, stdout, err = synth(capsys, *qa_args(teacher, docs, out, "min_score=0"))
    assert code == 0, err
    rows = read_csv(out / "qa.csv")
    assert len(rows) == 12 and "z-leave-again.txt" not in {row["doc"] for row in rows}
    assert json.loads((out / "provenance.json").read_text())["counts"]["duplicates_dropped"] == 4
    assert "duplicates dropped 4" in stdout


def test_near_duplicate_rule():
    texts = ["What is the notice period for leave?", "what is the notice period for leave",
             "What is the notice period for annual leave?", "Who approves travel?"]
    assert near_duplicates(texts, threshold=0.5) == [None, 0, 0, None]
    assert near_duplicates(texts, threshold=1.0) == [None, 0, None, None]


def test_judge_threshold_filters_and_a_rerun_only_refilters(teacher, docs, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = synth(capsys, *qa_args(teacher, docs, out, "min_score=4"))
    assert code == 0, err
    rows = read_csv(out / "qa.csv")
    assert rows and all(judge_score(row["question"]) >= 4 and int(row["score"]) >= 4 for row in rows)
    requests = len(teacher.log)
    code, _, err = synth(capsys, *qa_args(teacher, docs, out, "min_score=2"))
    assert code == 0, err
    assert len(teacher.log) == requests  # every item and verdict is in the progress log
    more = read_csv(out / "qa.csv")
    assert len(more) > len(rows) and all(judge_score(row["question"]) >= 2 for row in more)
    assert [row["id"] for row in more if int(row["score"]) >= 4] == [row["id"] for row in rows]


def test_killed_midway_a_rerun_asks_nothing_twice(docs, tmp_path, capsys, cache_dir):
    teacher = Teacher(block_after=3)
    out = tmp_path / "out"
    with serving_api(teacher.app) as url:
        teacher.url = url
        command = [sys.executable, "-m", "llmtune", "synth",
                   *qa_args(teacher, docs, out, "min_score=0", "concurrency=2")]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "LLMTUNE_CACHE": str(cache_dir)})
        try:
            wait_until(lambda: (out / PROGRESS_FILE).is_file() and len(
                (out / PROGRESS_FILE).read_text().splitlines()) == 3 and "blocked" in {w for _, _, w in teacher.log})
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
        first_run = teacher.answered()
        assert len(first_run) == 3 and not (out / "qa.csv").exists()

        teacher.block_after, teacher.log = None, []
        code, stdout, err = synth(capsys, *qa_args(teacher, docs, out, "min_score=0"))
        second_run = [item for item, _, _ in teacher.log]
        teacher.released.set()  # the killed run's requests, still held, end; the server can stop
    assert code == 0, err
    assert not set(first_run) & set(second_run) and len(second_run) == len(set(second_run)) == 3
    assert len(read_csv(out / "qa.csv")) == 12 and "(3 asked now, 3 answered earlier)" in stdout


def test_a_line_cut_short_by_a_kill_is_asked_again(tmp_path):
    out = tmp_path / "out"
    SynthFolder(out, {"kind": "qa"}).close()
    (out / PROGRESS_FILE).write_text('{"item": "qa/chunk-0", "value": {"rows": []}}\n{"item": "qa/chu')
    folder = SynthFolder(out, {"kind": "qa"})
    assert folder.done == {"qa/chunk-0": {"rows": []}}
    folder.append("qa/chunk-1", {"rows": []})
    folder.close()
    assert [json.loads(line)["item"] for line in (out / PROGRESS_FILE).read_text().splitlines()] == [
        "qa/chunk-0", "qa/chunk-1"]


def test_a_changed_configuration_is_refused(teacher, docs, tmp_path, capsys):
    out = tmp_path / "out"
    assert synth(capsys, *qa_args(teacher, docs, out, "min_score=0"))[0] == 0
    requests = len(teacher.log)
    (docs / "leave.txt").write_text("a changed handbook " * 20)
    line = error_line(*synth(capsys, *qa_args(teacher, docs, out, "min_score=0", "per_chunk=3"))[::2])
    assert "changed: documents, per_chunk" in line and "give a new out=" in line
    assert len(teacher.log) == requests


@pytest.mark.parametrize("args, expected", [
    (["qa", "documents={empty}", "out={out}", "url={url}"], "has no .txt, .md, .pdf files"),
    (["qa", "documents={docs}", "out={foreign}", "url={url}"], "already holds files that llmtune synth did not write"),
    (["labelled", "out={out}", "url={url}", "labels=spam", "instruction=x"], "labels=spam names 1 label"),
    (["labelled", "out={out}", "url={url}", "labels=spam,ham"], "needs instruction=TEXT"),
    (["qa", "documents={docs}", "out={out}", "url=localhost:8000"], "is not an http(s) URL"),
    (["qa", "documents={docs}", "out={out}", "url={url}", "chunk_size=10", "chunk_overlap=10"],
     "chunk_overlap=10 must be smaller than chunk_size=10"),
])
def test_bad_input_is_one_line_before_any_request(teacher, docs, tmp_path, capsys, args, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    values = {"empty": tmp_path / "empty", "docs": docs, "out": tmp_path / "out", "foreign": tmp_path / "foreign",
              "url": teacher.url}
    line = error_line(*synth(capsys, *[arg.format(**values) for arg in args])[::2])
    assert expected in line
    assert teacher.log == [] and (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_a_prompt_with_an_unknown_placeholder_is_one_line(teacher, docs, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "judge_qa.yaml").write_text("version: 2\nsystem: Grade.\nuser: Grade $question against $context\n")
    line = error_line(*synth(capsys, *qa_args(teacher, docs, tmp_path / "out", f"prompts={prompts}"))[::2])
    assert "judge_qa.yaml, user: synth fills no $context" in line and "$question" in line
    assert teacher.log == []


def test_replies_that_never_match_the_schema_stop_the_run(teacher, docs, tmp_path, capsys):
    teacher.faults = {"": ["off-schema"] * 100}
    out = tmp_path / "out"
    line = error_line(*synth(capsys, *qa_args(teacher, docs, out, "concurrency=1", "attempts=2"))[::2])
    assert "replies never matched the JSON schema" in line and "response_format json_schema" in line
    # 3 items, 2 attempts each, then it stops; the item already in flight (concurrency=1) finishes, unread.
    assert 6 <= len(teacher.log) <= 8
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["status"].startswith("stopped:") and provenance["counts"]["generation"]["invalid"] == 3


def test_unreachable_endpoint_is_one_line_from_the_cli(docs, tmp_path, cache_dir):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "llmtune", "synth", "qa", f"documents={docs}",
                             f"out={tmp_path / 'out'}", f"url=http://127.0.0.1:{port}/v1"],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "LLMTUNE_CACHE": str(cache_dir)})
    line = error_line(result.returncode, result.stderr)
    assert f"endpoint http://127.0.0.1:{port}/v1 is unreachable" in line
    assert not (tmp_path / "out").exists()


SHORT_PROMPTS = {  # the tiny model has 512 positions: prompt and reply must fit in them
    "qa.yaml": {"version": "test-1", "system": "Write JSON.",
                "user": 'Write $count pair as {"pairs": [{"question": "...", "answer": "..."}]} about: $text'},
    "judge_qa.yaml": {"version": "test-1", "system": "Grade as JSON.",
                      "user": 'Grade 1-5 as {"reason": "...", "score": N}: $question / $answer ($source, page '
                              '$page: $text)'},
}


def test_against_llmtune_serve_of_the_tiny_run(tiny_run, tmp_path, capsys):
    """Whatever the tiny model answers (random text, or JSON where serve constrains decoding to the schema) is
    counted, and the exit status and provenance.json agree with each other."""
    from llmtune.inference import load_run
    from llmtune.serve import create_app

    prompts, docs, out = tmp_path / "prompts", tmp_path / "docs", tmp_path / "out"
    prompts.mkdir()
    docs.mkdir()
    for name, content in SHORT_PROMPTS.items():
        (prompts / name).write_text(json.dumps(content))  # JSON is YAML
    (docs / "policy.txt").write_text("Staff take leave after approval. Profit rose and sales fell in the quarter.")
    loaded = load_run(tiny_run)
    with serving_api(create_app(loaded, max_new_tokens=48, max_prompt_tokens=256)) as url:
        code, stdout, err = synth(capsys, "qa", f"documents={docs}", f"out={out}", f"url={url}", f"prompts={prompts}",
                                  "chunk_size=8", "chunk_overlap=0", "per_chunk=1", "max_tokens=48", "attempts=2",
                                  "concurrency=2", "min_score=1", "timeout_s=60")
    provenance = json.loads((out / "provenance.json").read_text())
    generation, tally = provenance["counts"]["generation"], provenance["tally"]["teacher"]
    assert provenance["endpoint"]["model"] == loaded.name and provenance["prompts"]["qa"]["version"] == "test-1"
    assert generation["items"] == generation["asked"] == 2
    assert generation["asked"] == generation["valid"] + generation["invalid"] + generation["failed"]
    assert tally["failed_requests"] == generation["failed"]
    assert tally["requests"] == tally["invalid_replies"] + generation["valid"]
    assert tally["requests"] == 0 or tally["prompt_tokens"] > 0 < tally["completion_tokens"]
    if code == 0:  # serve constrained the replies to the schema: every verdict passes min_score=1
        counts = provenance["counts"]
        assert provenance["status"] == "complete" and len(read_csv(out / "qa.csv")) == counts["kept"] > 0
        assert counts["kept"] == counts["judged"] == counts["rows_valid"] - counts["duplicates_dropped"] - counts[
            "no_verdict"]
    else:  # random text: "replies never matched the JSON schema", the run stopped before writing a dataset
        line = error_line(code, err).removeprefix("llmtune: error: ")
        assert provenance["status"] == f"stopped: {line}" and not (out / "qa.csv").exists()
        phases = [provenance["counts"]["generation"], provenance["counts"]["judge"]]
        assert any(phase is not None and phase["valid"] == 0 for phase in phases)
