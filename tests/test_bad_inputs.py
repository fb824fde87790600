"""The bad-input catalogue: every bad or hostile input a user can hand any llmtune command, run through the real
command line (`python -m llmtune`, forked from tests/cli_server.py's process), ends the same way: exit code 2, exactly one `llmtune: error: ...` line on stderr naming
the problem, no traceback, and no file the user had changed (a run's own folder under outputs/ may appear, nothing
else).

Each case runs in a folder of its own (its working directory), holding the files it hands the command; the folder is
snapshot (path, sha256, size, mtime) before and after. The cases run a few at a time in a module fixture.
"""

import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_server import run_llmtune_in

WORKERS = max(3, min(6, os.cpu_count() or 1))  # the subprocesses mostly import; a few at a time overlap well
OUTPUTS = "outputs/"  # the one place a run (a Hydra job) may write: its own run folder
RUN = "run"  # a case folder's copy of the finished tiny run


@dataclass(frozen=True)
class Case:
    """`llmtune ARGS` in a fresh folder holding `files`; `{here}` in args and expected is that folder, `{port}` a port
    that is taken. files: relative path -> text, bytes, DIR (an empty folder) or a function(folder, finished_run)."""

    id: str
    args: tuple[str, ...]
    expected: str | tuple[str, ...]  # in the error line (each of them)
    files: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    # Found by the run itself, once Hydra made its folder: outputs/run may appear, its status.json saying why it failed.
    # Anything else is refused before any folder is made.
    run_folder: bool = False

    @property
    def needs_run(self) -> bool:
        return any(value in (copy_run, killed_run, failed_run) for value in self.files.values())


DIR = object()


def job(name: str, overrides: list[str], expected: str | tuple[str, ...], **kw) -> Case:
    """A run (`llmtune OVERRIDES`) on the tiny model, into outputs/run of its case folder."""
    return Case(f"run/{name}", ("model=tiny", *overrides, "hydra.run.dir=outputs/run"), expected, **kw)


def data(name: str, overrides: list[str], expected: str | tuple[str, ...], **kw) -> Case:
    """A run refused for its data, which only the run reads: its folder appears and records the failure."""
    return job(name, overrides, expected, run_folder=True, **kw)


def command(name: str, args: list[str], expected: str | tuple[str, ...], **kw) -> Case:
    return Case(f"{args[0]}/{name}", tuple(args), expected, **kw)


# --- Files the cases hand the commands -------------------------------------------------------------------------------

def csv_rows(rows_per_label: int, labels=("positive", "negative", "neutral"), header="id,text,label") -> str:
    lines = [header]
    for label in labels:
        lines += [f"{label}-{i},{label} news item number {i} about the company,{label}" for i in range(rows_per_label)]
    return "\n".join(lines) + "\n"


RANDOM_BYTES = random.Random(16).randbytes(4096)  # seeded: the same "binary file" every run
LATIN1 = "id,text,label\n1,Umsatz gestiegen: Gewinn \u00fcber Erwartungen,positive\n".encode("latin-1") * 3
SPEC_HEAD = "method: grid\nmetric: {name: val/accuracy, goal: maximize}\n"


def copy_run(folder: Path, finished: Path, target: str = RUN) -> Path:
    shutil.copytree(finished, folder / target)
    return folder / target


def killed_run(folder: Path, finished: Path) -> None:
    """A run killed with kill -9 before it saved its adapter: status.json still says running, its process is gone."""
    run = copy_run(folder, finished)
    shutil.rmtree(run / "adapter")
    dead = subprocess.Popen(["true"])
    dead.wait()
    status = json.loads((run / "status.json").read_text())
    status.update(status="running", finished=None, pid=dead.pid)
    (run / "status.json").write_text(json.dumps(status, indent=2) + "\n")


def failed_run(folder: Path, finished: Path) -> None:
    """A run that stopped with an error before it saved its adapter."""
    run = copy_run(folder, finished)
    shutil.rmtree(run / "adapter")
    status = json.loads((run / "status.json").read_text())
    status.update(status="failed", error="RuntimeError: out of memory")
    (run / "status.json").write_text(json.dumps(status, indent=2) + "\n")


SENTENCES = "text\nProfit rose sharply\nThe outlook was cut\n"

# --- The catalogue ---------------------------------------------------------------------------------------------------

CASES = [
    # A run's settings: types and ranges (schema.py), keys and group options (config.check_overrides).
    job("max_epochs=abc", ["trainer.max_epochs=abc"], "trainer.max_epochs='abc' must be a valid integer"),
    job("batch_size=abc", ["trainer.batch_size=abc"], "trainer.batch_size='abc' must be a valid integer"),
    job("max_epochs=0", ["trainer.max_epochs=0"], "trainer.max_epochs=0 trains nothing, so the tuned model would be "
                                                 "the base", run_folder=True),
    job("max_steps=0", ["trainer.max_steps=0"], "trainer.max_steps=0 trains nothing", run_folder=True),
    job("no end", ["trainer.max_epochs=-1"], "trainer.max_epochs=-1 and trainer.max_steps=-1 train without end",
        run_folder=True),
    job("max_time=10min", ["trainer.max_time=10min"],
        "trainer.max_time='10min' must be \"DD:HH:MM:SS\", e.g. 00:00:10:00 for ten minutes"),
    job("seed=abc", ["seed=abc"], "seed='abc' must be a valid integer"),
    job("seed=-1", ["seed=-1"], "seed=-1 must be greater than or equal to 0"),
    job("lora.r=0", ["method.lora.r=0"], "method.lora.r=0 must be greater than or equal to 1"),
    job("lora.r=-1", ["method.lora.r=-1"], "method.lora.r=-1 must be greater than or equal to 1"),
    job("lr=-1", ["method.optimizer.lr=-1"], "method.optimizer.lr=-1 must be greater than 0"),
    job("lora_dropout=2", ["method.lora.lora_dropout=2"], "method.lora.lora_dropout=2 must be less than 1"),
    job("label_smoothing=1", ["method.label_smoothing=1"], "method.label_smoothing=1 must be less than 1"),
    job("neftune_noise_alpha=-1", ["method.neftune_noise_alpha=-1"],
        "method.neftune_noise_alpha=-1 must be greater than or equal to 0"),
    job("accelerator=gpuu", ["trainer.accelerator=gpuu"], "trainer.accelerator='gpuu' must be 'auto', 'cpu'"),
    job("rag=no", ["rag=no"], "rag='no' must be true or false"),
    job("rag=maybe", ["rag=maybe"], "rag='maybe' must be true or false"),
    job("rag=1", ["rag=1"], "rag=1 must be true or false"),
    job("dtype=int3", ["model.dtype=int3"], "model.dtype='int3' must be 'bfloat16', 'float16' or 'float32'"),
    job("duplicates=maybe", ["dataset.duplicates=maybe"], "dataset.duplicates='maybe' must be 'drop' or 'keep'"),
    job("typo'd key", ["trainer.max_epoch=2"], "unknown config key 'trainer.max_epoch' (did you mean "
                                               "'trainer.max_epochs'?)"),
    job("unknown model", ["model=nosuchmodel"], "model=nosuchmodel is not a known model config"),
    job("unknown method", ["method=nosuch"], "method=nosuch is not a known method config"),
    job("unknown dataset", ["dataset=nosuch"], "dataset=nosuch is not a known dataset config"),
    job("eval.batch_size=0", ["eval.batch_size=0"], "eval.batch_size=0 must be greater than or equal to 1"),
    job("retriever.k=0", ["rag=true", "retriever.k=0"], "retriever.k=0 must be greater than or equal to 1"),
    job("chunk_size=0", ["dataset=hr_demo", "rag=true", "retriever.chunk_size=0"],
        "retriever.chunk_size=0 must be greater than or equal to 1"),
    job("chunk_overlap above chunk_size", ["dataset=hr_demo", "rag=true", "retriever.chunk_overlap=500"],
        "retriever.chunk_overlap=500 must be below retriever.chunk_size=80"),
    job("unreadable override", ["seed=1=2"], "cannot read the override 'seed=1=2'"),
    job("several values without -m", ["seed=1,2"], "seed=1,2 gives several values, which makes a grid of runs: add -m"),
    job("not a trainer setting", ["+trainer.ckpt_path=x"], "trainer.ckpt_path is not a setting of lightning's Trainer"),
    job("precision=banana", ["trainer.precision=banana"],
        ("lightning's Trainer refuses", "Precision 'banana' is invalid")),
    job("devices=abc", ["trainer.devices=abc"], ("lightning's Trainer refuses", "trainer.devices=abc")),
    job("an accelerator the machine lacks", ["trainer.accelerator=tpu"],
        ("lightning's Trainer refuses", "trainer.accelerator=tpu")),
    job("ddp on a GPU this machine lacks", ["trainer=ddp", "trainer.accelerator=gpu"],
        ("lightning's Trainer refuses", "trainer.accelerator=gpu", "need CUDA GPUs")),
    job("a strategy that does not exist", ["trainer.strategy=nosuch"],
        ("lightning's Trainer refuses", "invalid strategy name: `strategy='nosuch'`")),
    job("a trainer preset that does not exist", ["trainer=nosuch"],
        "trainer=nosuch is not a known trainer config; choose one of ddp, deepspeed_zero2"),
    job("fsdp without a GPU", ["trainer=fsdp"], ("LayerWiseFSDP shards the model across CUDA GPUs", "trainer=ddp")),
    Case("run/unknown command", ("predcit", "x"), "unknown command 'predcit'; did you mean predict?"),
    job("config path not a folder", [], "LLMTUNE_CONFIG_PATH names {here}/no-configs, which is not a folder",
        env={"LLMTUNE_CONFIG_PATH": "{here}/no-configs"}),

    # Data files, given to the shipped sentiment dataset's config (dataset.path) or the Q&A demo's (documents).
    data("missing file", ["dataset.path={here}/nowhere.csv"], "dataset file not found: {here}/nowhere.csv"),
    data("empty file", ["dataset.path={here}/data.csv"], "dataset file {here}/data.csv is empty (0 bytes)",
        files={"data.csv": ""}),
    data("header-only CSV", ["dataset.path={here}/data.csv"], "dataset file {here}/data.csv has no rows",
        files={"data.csv": "id,text,label\n"}),
    data("Latin-1 read as UTF-8", ["dataset.path={here}/data.csv"], "could not read {here}/data.csv as csv",
        files={"data.csv": LATIN1}),
    data("binary file", ["dataset.path={here}/data.csv"], "could not read {here}/data.csv as csv",
        files={"data.csv": RANDOM_BYTES}),
    data("no text column", ["dataset.path={here}/data.csv"], ("data.csv has no column", "'text'"),
        files={"data.csv": csv_rows(130, header="id,sentence,label")}),
    data("no label column", ["dataset.path={here}/data.csv"], ("data.csv has no column", "'label'"),
        files={"data.csv": csv_rows(130, header="id,text,sentiment")}),
    data("unknown label", ["dataset.path={here}/data.csv"], "label 'bullish', which is not in dataset.labels",
        files={"data.csv": csv_rows(130) + "x-1,to the moon,bullish\n"}),
    data("single-class file", ["dataset.path={here}/data.csv"], "label 'negative' has 0 rows",
        files={"data.csv": csv_rows(200, labels=("positive",))}),
    data("broken JSONL line", ["dataset.path={here}/data.jsonl"], "could not read {here}/data.jsonl as json",
        files={"data.jsonl": '{"id": 1, "text": "up", "label": "positive"}\n{"id": 2, "text": "down", "label\n'}),
    data("unreachable Hub id", ["dataset.path=acme/no-such-dataset"],
        ("dataset.path=acme/no-such-dataset is neither a local", "nor a loadable Hub dataset")),
    data("unsupported extension", ["dataset.path={here}/data.txt"], "{here}/data.txt is not a .csv, .tsv, .json",
        files={"data.txt": csv_rows(130)}),
    data("empty path", ["dataset.path="], "dataset.path= is neither"),
    data("path is an empty folder", ["dataset.path={here}/folder"], "dataset.path={here}/folder is neither",
        files={"folder": DIR}),
    data("Q&A file without the question column", ["dataset=hr_demo", "dataset.qa_file={here}/qa.csv"],
        ("qa.csv has no column", "question_column='question'"), files={"qa.csv": "id,q,answer\n1,a,b\n"}),
    data("too few rows per class", ["dataset.path={here}/data.csv"], "label 'positive' has 5 rows",
        files={"data.csv": csv_rows(5)}),
    data("documents folder missing", ["dataset=hr_demo", "rag=true", "retriever=bm25",
                                     "dataset.documents={here}/no-docs"],
        "documents folder not found: {here}/no-docs"),
    data("documents folder empty", ["dataset=hr_demo", "rag=true", "retriever=bm25", "dataset.documents={here}/docs"],
        "documents folder {here}/docs has no .txt, .md, .pdf files", files={"docs": DIR}),

    # resume=RUN_DIR (__main__.resumed_overrides).
    Case("resume/folder missing", ("resume={here}/nowhere",), "resume={here}/nowhere is not a run folder"),
    Case("resume/not a run", ("resume={here}/folder",), "resume={here}/folder is not a run folder",
         files={"folder/notes.txt": "mine"}),

    # llmtune sweep SPEC (sweep.load_spec, check_keys).
    command("spec missing", ["sweep", "nowhere.yaml"], "sweep spec nowhere.yaml not found"),
    command("binary spec", ["sweep", "spec.yaml"], "sweep spec spec.yaml is not UTF-8 text",
            files={"spec.yaml": RANDOM_BYTES}),
    command("spec is a folder", ["sweep", "spec"], "sweep spec spec is a folder", files={"spec": DIR}),
    command("invalid YAML", ["sweep", "spec.yaml"], "sweep spec spec.yaml is not valid YAML",
            files={"spec.yaml": SPEC_HEAD + "parameters: {method.lora.r: {values: [8, 16]}\n"}),
    command("empty spec", ["sweep", "spec.yaml"], "sweep spec spec.yaml is not a YAML mapping",
            files={"spec.yaml": ""}),
    command("unknown parameter", ["sweep", "spec.yaml", "model=tiny"],
            "unknown config key 'method.lora.rank'",
            files={"spec.yaml": SPEC_HEAD + "parameters:\n  method.lora.rank: {values: [8, 16]}\n"}),
    command("grid of a non-list", ["sweep", "spec.yaml"], "parameter method.lora.r: `values` must be a non-empty list",
            files={"spec.yaml": SPEC_HEAD + "parameters:\n  method.lora.r: {values: 8}\n"}),
    command("count=0", ["sweep", "spec.yaml", "count=0"], "count=0 must be at least 1",
            files={"spec.yaml": SPEC_HEAD + "parameters:\n  method.lora.r: {values: [8, 16]}\n"}),

    # llmtune predict RUN_DIR input=FILE (predict.py, inference.load_run).
    command("run folder missing", ["predict", "{here}/nowhere", "input=in.csv"],
            "run directory {here}/nowhere does not exist", files={"in.csv": SENTENCES}),
    command("not a run", ["predict", "{here}/folder", "input=in.csv"], "{here}/folder has no config.yaml",
            files={"in.csv": SENTENCES, "folder/notes.txt": "mine"}),
    command("killed run", ["predict", "{here}/run", "input=in.csv"], "{here}/run has no adapter/",
            files={"in.csv": SENTENCES, RUN: killed_run}),
    command("failed run", ["predict", "{here}/run", "input=in.csv"], "{here}/run has no adapter/",
            files={"in.csv": SENTENCES, RUN: failed_run}),
    command("batch_size=-1", ["predict", "{here}/run", "input=in.csv", "batch_size=-1"],
            "batch_size=-1 must be at least 1", files={"in.csv": SENTENCES, RUN: copy_run}),
    command("out is the input", ["predict", "{here}/run", "input=in.csv", "out=./in.csv"],
            "out=in.csv is the input file", files={"in.csv": SENTENCES, RUN: copy_run}),
    command("out is a folder", ["predict", "{here}/run", "input=in.csv", "out=folder"], "out=folder is a folder",
            files={"in.csv": SENTENCES, "folder/notes.txt": "mine", RUN: copy_run}),
    command("out exists", ["predict", "{here}/run", "input=in.csv", "out=earlier.jsonl"],
            "out=earlier.jsonl already exists: pass overwrite=true",
            files={"in.csv": SENTENCES, "earlier.jsonl": "{}\n", RUN: copy_run}),
    command("input missing", ["predict", "{here}/run", "input=nowhere.csv"], "input=nowhere.csv does not exist",
            files={RUN: copy_run}),
    command("input not UTF-8", ["predict", "{here}/run", "input=in.csv"], "input=in.csv is not UTF-8 text",
            files={"in.csv": RANDOM_BYTES, RUN: copy_run}),
    command("input without usable rows", ["predict", "{here}/run", "input=in.csv"],
            "in.csv has no usable rows (0 of 2)", files={"in.csv": "text,id\n ,1\n,2\n", RUN: copy_run}),
    command("input without the text column", ["predict", "{here}/run", "input=in.csv"],
            "the CSV header has no 'text' column", files={"in.csv": "sentence\nProfit rose\n", RUN: copy_run}),
    command("unknown option", ["predict", "{here}/run", "input=in.csv", "foo=1"], "unknown option 'foo=1'",
            files={"in.csv": SENTENCES, RUN: copy_run}),
    command("output=xml", ["predict", "{here}/run", "input=in.csv", "output=xml"],
            "output=xml is not known; use one of jsonl, csv, json", files={"in.csv": SENTENCES, RUN: copy_run}),

    # llmtune export RUN_DIR (export/cli.py, files.check_output_folder).
    command("out=.", ["export", "{here}/run", "out=."], "out=. is the current directory or one of its parents",
            files={RUN: copy_run}),
    command("out=..", ["export", "{here}/run", "out=.."], "out=.. is the current directory or one of its parents",
            files={RUN: copy_run}),
    command("out is a user folder", ["export", "{here}/run", "out=mine", "overwrite=true"],
            "out=mine already holds files llmtune did not write",
            files={"mine/notes.txt": "my notes", RUN: copy_run}),
    command("out is a file", ["export", "{here}/run", "out=notes.txt"], "out=notes.txt is a file, not a folder",
            files={"notes.txt": "my notes", RUN: copy_run}),
    command("format=nosuch", ["export", "{here}/run", "format=nosuch"], "format=nosuch is not known",
            files={RUN: copy_run}),
    command("quant=nosuch", ["export", "{here}/run", "format=gguf", "quant=nosuch"],
            "quant=nosuch is not a GGUF type", files={RUN: copy_run}),
    command("run folder missing", ["export", "{here}/nowhere"], "run directory {here}/nowhere does not exist"),
    command("killed run", ["export", "{here}/run", "out=exported"], "{here}/run has no adapter/",
            files={RUN: killed_run}),

    # llmtune report DIR (report/compare.py).
    command("no runs", ["report", "{here}/folder"], "no runs under {here}/folder",
            files={"folder/notes.txt": "mine"}),
    command("folder missing", ["report", "{here}/nowhere"], "{here}/nowhere is not a folder"),
    command("unknown metric", ["report", "{here}/folder", "metric=test/nosuch"], "unknown metric 'test/nosuch'",
            files={"folder/notes.txt": "mine"}),

    # llmtune serve RUN_DIR, where it stops before serving (serve.main).
    command("run folder missing", ["serve", "{here}/nowhere"], "run directory {here}/nowhere does not exist"),
    command("not a run", ["serve", "{here}/folder"], "{here}/folder has no config.yaml",
            files={"folder/notes.txt": "mine"}),
    command("port=0", ["serve", "{here}/run", "port=0"], "port=0 must be 1 to 65535", files={RUN: copy_run}),
    command("port taken", ["serve", "{here}/run", "port={port}"], "cannot listen on 127.0.0.1:{port}",
            files={RUN: copy_run}),
]


# --- Running them ----------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    values: dict  # what {here} and {port} stand for
    before: dict
    after: dict
    after_status: str  # outputs/run/status.json of a run, "" where there is none
    seconds: float


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file under folder: (sha256, size, mtime); every folder: its path."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            entries[name] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns)
        else:
            entries[name] = ("folder" if path.is_dir() else "other",)
    return entries


def environment(cache_dir: Path, extra: dict) -> dict:
    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_CACHE": str(cache_dir / "empty-hf-cache"), **extra}
    for name in ("HYDRA_FULL_ERROR", "LLMTUNE_CONFIG_PATH"):
        if name not in extra:
            env.pop(name, None)
    return env


def llmtune(args: list[str], folder: Path, env: dict) -> subprocess.CompletedProcess:
    return run_llmtune_in(folder, args, env)


def train_finished_run(folder: Path, cache_dir: Path) -> Path:
    """One real tiny run, trained briefly: what predict, export and serve are handed (copied, never changed)."""
    folder.mkdir()
    result = llmtune(["model=tiny", "trainer.max_epochs=1", "dataset.split.train_per_class=4",
                      "dataset.split.val_per_class=0", "dataset.split.test_per_class=4", "eval.baseline=false",
                      "hydra.run.dir=finished"], folder, environment(cache_dir, {}))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "finished"


def run_case(case: Case, folder: Path, cache_dir: Path, finished: Path | None, port: int) -> Outcome:
    folder.mkdir(parents=True)
    values = {"here": str(folder), "port": str(port)}
    for name, content in case.files.items():
        path = folder / name
        if callable(content):
            content(folder, finished)
        elif content is DIR:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    env = environment(cache_dir, {key: value.format(**values) for key, value in case.env.items()})
    before = snapshot(folder)
    started = time.perf_counter()
    result = llmtune([arg.format(**values) for arg in case.args], folder, env)
    seconds = time.perf_counter() - started
    status = folder / OUTPUTS / "run" / "status.json"
    return Outcome(result, values, before, snapshot(folder), status.read_text() if status.is_file() else "", seconds)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, cache_dir) -> dict[str, Outcome]:
    """Every selected case, run a few at a time; the finished run they need is trained alongside the others."""
    selected = {item.callspec.params["case"].id: item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    root = tmp_path_factory.mktemp("bad-inputs")
    taken = socket.create_server(("127.0.0.1", 0))  # a port in use, for serve
    port = taken.getsockname()[1]
    started = time.perf_counter()
    with taken, ThreadPoolExecutor(WORKERS) as pool:
        need_run = [case for case in selected.values() if case.needs_run]
        training = pool.submit(train_finished_run, root / "finished-run", cache_dir) if need_run else None
        folders = {case.id: root / re.sub(r"[^\w.-]", "_", case.id.replace("/", "--")) for case in selected.values()}
        futures = {case.id: pool.submit(run_case, case, folders[case.id], cache_dir, None, port)
                   for case in selected.values() if not case.needs_run}
        finished = training.result() if training else None
        futures.update({case.id: pool.submit(run_case, case, folders[case.id], cache_dir, finished, port)
                        for case in need_run})
        done = {name: future.result() for name, future in futures.items()}
    groups: dict[str, list[float]] = {}
    for name, outcome in done.items():
        groups.setdefault(name.split("/")[0], []).append(outcome.seconds)
    per_case = ", ".join(f"{group} {sum(times) / len(times):.1f} ({len(times)})" for group, times in groups.items())
    print(f"\n{len(done)} bad-input cases in {time.perf_counter() - started:.0f} s, {WORKERS} at a time; seconds per "
          f"case: {per_case}")
    return done


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(outcomes, case):
    outcome = outcomes[case.id]
    result = outcome.result
    shown = f"exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert result.returncode == 2, shown
    errors = [line for line in result.stderr.splitlines() if line.startswith("llmtune: error:")]
    assert len(errors) == 1, shown
    for expected in [case.expected] if isinstance(case.expected, str) else case.expected:
        assert expected.format(**outcome.values) in errors[0], shown
    changed = sorted(name for name, entry in outcome.before.items() if outcome.after.get(name) != entry)
    assert not changed, f"changed or removed: {changed}"
    new = sorted(name for name in outcome.after if name not in outcome.before)
    stray = [name for name in new if not (case.run_folder and (name + "/").startswith(OUTPUTS))]
    assert not stray, f"written {'outside the run folder' if case.run_folder else 'before refusing'}: {stray}"
    if case.run_folder:  # the run's folder records why it failed (llmtune report lists it)
        status = json.loads(outcome.after_status)
        assert status["status"] == "failed" and status["error"] == errors[0].removeprefix("llmtune: error: "), status


def test_the_catalogue_has_one_case_per_id():
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("work", [None, "checkpoints/last.ckpt", "checkpoints/step=4.ckpt", "base_predictions.jsonl",
                                  "adapter/adapter_model.safetensors", "metrics.json"])
def test_a_refused_attempt_does_not_bind_its_run_folder(tmp_path, work):
    """After a bad input, the corrected command runs in the same folder (hydra.run.dir): an attempt refused before it
    did any work leaves nothing to continue. Once a folder holds work, another run's settings are still refused."""
    import yaml

    from llmtune.errors import UserError
    from llmtune.run_state import check_same_run, write_status

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "dataset": {"path": "typo.csv"}}))
    write_status(tmp_path, "failed", "t0", "dataset file not found: typo.csv")
    if work is None:
        check_same_run(tmp_path, {"seed": 1, "dataset": {"path": "data.csv"}})
        return
    (tmp_path / work).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / work).write_bytes(b"work")
    with pytest.raises(UserError, match=r"holds a run with other settings \(dataset.path: 'typo.csv' -> 'data.csv'\)"):
        check_same_run(tmp_path, {"seed": 1, "dataset": {"path": "data.csv"}})
