"""One command-line convention (llmtune.cli): `llmtune <command> ... key=value`, generated --help, one error line.

The subprocess tests run the real CLI; none loads a model: every bad option is refused before anything slow."""

import dataclasses
import importlib
from pathlib import Path
from typing import Literal

import pytest
from conftest import run_llmtune
from test_report import fabricate_run

from llmtune.__main__ import COMMANDS
from llmtune.cli import option, parse, positional, rest
from llmtune.errors import UserError

ARGS_CLASSES = {"sweep": "SweepArgs", "report": "ReportArgs", "export": "ExportArgs", "predict": "PredictArgs",
                "serve": "ServeArgs", "synth": "SynthArgs"}


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("llmtune: error:"), result.stderr
    return lines[0]


def test_help_lists_every_command_and_how_to_run_a_job(cache_dir):
    result = run_llmtune(["--help"], cache_dir)
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert f"  {name}  " in result.stdout
    assert "llmtune -m method=instruct,causal" in result.stdout
    assert "method: causal, classifier" in result.stdout  # Hydra's config groups follow


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_help_names_every_option_with_type_and_default(cache_dir, command):
    args_class = getattr(importlib.import_module(COMMANDS[command].module), ARGS_CLASSES[command])
    result = run_llmtune([command, "--help"], cache_dir)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: llmtune {command} "), result.stderr
    for field in dataclasses.fields(args_class):
        if field.metadata["kind"] == "option":
            assert f"  {field.name}=" in result.stdout, field.name
    assert "default: " in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["sweep", "sweeps/lora_grid.yaml", "--cuont", "2"], "unknown option '--cuont' (did you mean count=...?)"),
    (["report", "outputs", "metrc=test/accuracy"], "unknown option 'metrc=test/accuracy' (did you mean metric="),
    (["export", "no-run", "check=yes"], "check='yes' is not true or false"),
    (["predict", "no-run", "input=-", "batch-size=-2"], "batch_size=-2 must be at least 1"),
    (["serve", "no-run", "port=0"], "port=0 must be 1 to 65535"),
    (["predcit", "no-run"], "did you mean predict?"),
])
def test_a_bad_option_is_one_error_line_and_exit_2(cache_dir, args, expected):
    assert expected in one_error_line(run_llmtune(args, cache_dir))


def test_key_value_and_dashed_forms_do_the_same(cache_dir, tmp_path):
    run = fabricate_run(tmp_path / "12-00-00-a1b2c3_tiny-instruct-rag=False", wrong={1, 2})  # '=' in RUN_DIR
    reports = []
    for name, options in [("plain", ["metric=test/macro_f1", "out={out}"]),
                          ("dashed", ["--metric=test/macro_f1", "--out", "{out}"])]:
        out = tmp_path / name
        result = run_llmtune(["report", str(run), *[o.format(out=out) for o in options]], cache_dir)
        assert result.returncode == 0, result.stderr[-2000:]
        reports.append((out / "report.md").read_text().replace(str(out), "OUT"))
    assert reports[0] == reports[1] and "test/macro_f1" in reports[0]


# --- The parser itself, in process ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    """An example command."""

    run_dir: Path = positional("a run", metavar="RUN_DIR")
    input: str = option(help="what to read", metavar="FILE")
    size: int = option(0, "rows", minimum=0, maximum=8)
    ratio: float | None = option(None, "a fraction")
    kind: Literal["a", "b"] = option("a", "which one")
    keep: bool = option(False, "keep it")


def test_every_spelling_of_an_option_gives_the_same_value():
    expected = Example(Path("r=1"), input="x", size=3, ratio=0.5, kind="b", keep=True)
    for argv in (["r=1", "input=x", "size=3", "ratio=0.5", "kind=b", "keep=true"],
                 ["r=1", "--input=x", "--size", "3", "--ratio=0.5", "--kind", "b", "--keep=TRUE"],
                 ["--size=3", "r=1", "input=x", "ratio=.5", "kind=b", "keep=true"]):
        assert parse(Example, argv, "example") == expected


@pytest.mark.parametrize("argv, expected", [
    (["r", "input=x", "sise=2"], "unknown option 'sise=2' (did you mean size=2?); options are input=FILE, size=0"),
    (["r", "input=x", "--colour=red"], "unknown option '--colour=red'"),
    (["r", "input=x", "size=two"], "size='two' is not an integer; e.g. size=0"),
    (["r", "input=x", "size=9"], "size=9 must be 0 to 8"),
    (["r", "input=x", "ratio=half"], "ratio='half' is not a number"),
    (["r", "input=x", "kind=c"], "kind=c is not known; use one of a, b"),
    (["r", "input=x", "keep=1"], "keep='1' is not true or false"),
    (["r"], "needs input=FILE: what to read"),
    (["input=x"], "the following arguments are required: RUN_DIR"),
    (["r", "input=x", "extra"], "unexpected argument 'extra'"),
    (["r", "input=x", "--size"], "argument --size: expected one argument"),
])
def test_bad_arguments_are_one_line_user_errors(argv, expected):
    with pytest.raises(UserError) as error:
        parse(Example, argv, "example")
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_help_is_generated_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(Example, ["r", "--help"], "example")
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "usage: llmtune example RUN_DIR input=FILE [size=INT] [ratio=NUMBER] [kind=a|b] [keep=true|false]" in out
    assert "size=INT" in out and "(0 to 8; default: 0)" in out and "(required)" in out and "An example command." in out


@dataclasses.dataclass(frozen=True)
class WithOverrides:
    """A command that passes the other key=value words on (as sweep does to Hydra)."""

    spec: Path = positional("a spec", metavar="SPEC")
    count: int | None = option(None, "how many", minimum=1)
    search_seed: int = option(42, "the search's seed", flags=("--seed",))
    overrides: list[str] = rest("Hydra overrides", metavar="OVERRIDE")


def test_words_that_are_not_options_pass_on_as_overrides():
    parsed = parse(WithOverrides, ["s.yaml", "model=tiny", "count=2", "seed=1", "--seed", "7", "hydra.run.dir=a=b"],
                   "sweep")
    assert parsed == WithOverrides(Path("s.yaml"), count=2, search_seed=7,
                                   overrides=["model=tiny", "seed=1", "hydra.run.dir=a=b"])
