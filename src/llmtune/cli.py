"""One command-line convention for every `llmtune <command>`: options are `key=value` (`--key=value` and `--key value`
work too), declared once as a typed dataclass from which argparse builds the parser and the `--help` text.

    @dataclass(frozen=True)
    class Args:
        \"\"\"What the command does (the first lines of its --help).\"\"\"
        run_dir: Path = positional("a finished run's folder", metavar="RUN_DIR")
        port: int = option(8000, "port to listen on", minimum=1, maximum=65535)
        output: Literal["jsonl", "csv"] = option("jsonl", "file format")

    args = parse(Args, argv, "serve")

Types: str, int, float, bool (true or false only), Path, Literal[...] (choices), `X | None` (an empty value gives
None); a field without a default is required. Every mistake is one UserError line naming the fix, so `llmtune: error:`
and exit 2 come from errors.report_user_errors as for every other bad input.
"""

import argparse
import dataclasses
import difflib
import inspect
import re
import shutil
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from llmtune.errors import UserError

T = TypeVar("T")
KEY_VALUE = re.compile(r"([A-Za-z_][\w-]*)=(.*)", re.DOTALL)
HELP_FLAGS = ("-h", "--help")
KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}
METAVARS = {int: "INT", float: "NUMBER", bool: "true|false", Path: "PATH", str: "TEXT"}


Quantize = Literal["none", "int8"]  # predict's and serve's quantize= (llmtune.models.int8)


def quantize_choice(given: str | None, cfg) -> str | None:
    """predict's and serve's quantize=: as given on the command line, else the run's eval.quantize; None: no
    quantisation."""
    choice = given or cfg.eval.get("quantize") or "none"
    return None if choice == "none" else choice


def option(default: Any = dataclasses.MISSING, help: str = "", *, metavar: str | None = None,
           minimum: float | None = None, maximum: float | None = None, range_text: str | None = None,
           default_text: str | None = None, flags: tuple[str, ...] = ()) -> Any:
    """A `key=value` option; no default makes it required. range_text replaces the generated "at least N" / "N to M"
    in --help and in the error; default_text says what a None or 0 default means; flags are extra `--name`s."""
    return dataclasses.field(default=default, metadata={
        "kind": "option", "help": help, "metavar": metavar, "minimum": minimum, "maximum": maximum,
        "range_text": range_text, "default_text": default_text, "flags": flags})


def positional(help: str, *, metavar: str) -> Any:
    """A required positional argument, e.g. RUN_DIR: taken as such even when its name holds '=' (rag=False)."""
    return dataclasses.field(metadata={"kind": "positional", "help": help, "metavar": metavar})


def rest(help: str, *, metavar: str) -> Any:
    """Every remaining argument, in order (a list of str), e.g. the Hydra overrides a sweep passes to each trial."""
    return dataclasses.field(default_factory=list, metadata={"kind": "rest", "help": help, "metavar": metavar})


def parse(spec: type[T], argv: list[str], command: str) -> T:
    """argv parsed into an instance of the dataclass `spec`; `-h`/`--help` prints the generated help and exits 0."""
    command_line = CommandLine(spec, command)
    if any(arg in HELP_FLAGS for arg in argv):
        command_line.parser.print_help()
        sys.exit(0)
    return command_line.parse(argv)


class CommandLine:
    """The argparse parser built from a dataclass, and the conversion of what it collects into typed values."""

    def __init__(self, spec: type, command: str):
        self.spec, self.command = spec, command
        hints = typing.get_type_hints(spec)
        self.fields = [(field, hints[field.name]) for field in dataclasses.fields(spec)]
        self.options = {field.name: (field, kind) for field, kind in self.fields if field.metadata["kind"] == "option"}
        self.positionals = [field for field, _ in self.fields if field.metadata["kind"] == "positional"]
        self.takes_rest = any(field.metadata["kind"] == "rest" for field, _ in self.fields)
        self.flags = {flag: name for name, (field, _) in self.options.items() for flag in _flags(name, field)}
        self.parser = self._build_parser()

    def _build_parser(self) -> argparse.ArgumentParser:
        parser = ErrorAsUserError(prog=f"llmtune {self.command}", usage=self._usage(), add_help=False,
                                  allow_abbrev=False, formatter_class=KeyValueHelpFormatter,
                                  description=inspect.cleandoc(self.spec.__doc__ or ""))
        for field, _ in self.fields:
            meta = field.metadata
            if meta["kind"] == "positional":
                parser.add_argument(field.name, metavar=meta["metavar"], help=meta["help"])
            elif meta["kind"] == "rest":  # a default, or argparse counts an empty list as missing
                parser.add_argument(field.name, metavar=meta["metavar"], help=meta["help"], nargs="*", default=[])
        group = parser.add_argument_group("options (key=value, or --key=value, or --key value)")
        for name, (field, kind) in self.options.items():
            # Values stay strings here: _convert gives every type one error wording, however the option was written.
            group.add_argument(*_flags(name, field), dest=name, metavar=_metavar(field, kind), default=None,
                               help=_help_line(field))
        group.add_argument(*HELP_FLAGS, action="help", help="show this help and exit")
        return parser

    def _usage(self) -> str:
        words = [f"llmtune {self.command}"]
        for field, kind in self.fields:
            meta = field.metadata
            if meta["kind"] == "positional":
                words.append(meta["metavar"])
            elif meta["kind"] == "rest":
                words.append(f"[{meta['metavar']} ...]")
            elif _required(field):
                words.append(f"{field.name}={_metavar(field, kind)}")
            else:
                words.append(f"[{field.name}={_metavar(field, kind)}]")
        return textwrap.fill(" ".join(words), width=100, subsequent_indent="    ", break_long_words=False,
                             break_on_hyphens=False)

    def parse(self, argv: list[str]) -> Any:
        namespace, extras = self.parser.parse_known_intermixed_args(self._as_flags(argv))
        for arg in extras:
            if arg.startswith("-"):
                raise self._unknown(arg)
            raise UserError(f"llmtune {self.command}: unexpected argument {arg!r}; see llmtune {self.command} --help")
        values = {}
        for field, kind in self.fields:
            raw = getattr(namespace, field.name)
            if field.metadata["kind"] == "rest":
                values[field.name] = list(raw)
            elif raw is not None:
                try:
                    values[field.name] = _convert(raw, kind, field)
                except UserError as error:
                    raise UserError(f"llmtune {self.command}: {error}") from None
            elif _required(field):
                raise UserError(f"llmtune {self.command} needs {field.name}={_metavar(field, kind)}: "
                                f"{field.metadata['help']}")
        return self.spec(**values)

    def _as_flags(self, argv: list[str]) -> list[str]:
        """`key=value` becomes `--key=value` for argparse. A word with '=' that is not one of the command's options is
        a positional while one is still missing (a run folder named ...-rag=False), a Hydra override for a command
        that passes them on (sweep), and an unknown option otherwise."""
        converted, positionals, value_follows = [], 0, False
        for arg in argv:
            match = KEY_VALUE.fullmatch(arg)
            if value_follows or arg.startswith("-"):
                value_follows = not value_follows and arg in self.flags  # `--key value`: the next word is the value
                converted.append(arg)
            elif match and match[1].replace("-", "_") in self.options:
                converted.append(f"--{match[1].replace('-', '_')}={match[2]}")
            elif match and not self.takes_rest and positionals >= len(self.positionals):
                raise self._unknown(arg)
            else:
                converted.append(arg)
                positionals += 1
        return converted

    def _unknown(self, arg: str) -> UserError:
        name, given, value = arg.lstrip("-").partition("=")
        close = difflib.get_close_matches(name.replace("-", "_"), list(self.options), n=1)
        hint = f" (did you mean {close[0]}={value if given else '...'}?)" if close else ""
        accepted = ", ".join(f"{key}={_shown_default(field, kind)}" for key, (field, kind) in self.options.items())
        return UserError(f"llmtune {self.command}: unknown option {arg!r}{hint}; options are {accepted}")


class ErrorAsUserError(argparse.ArgumentParser):
    """argparse's own complaints (a missing RUN_DIR, `--key` without its value) as one UserError line, not usage +
    exit: the caller's report_user_errors prints it as `llmtune: error: ...` with exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


class KeyValueHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Options listed as `key=TYPE`, the form the commands document, instead of argparse's `--key TYPE`."""

    def __init__(self, prog: str):
        # The terminal's width, capped at the project's 120 columns; 120 in a pipe or a log (argparse says 80).
        super().__init__(prog, max_help_position=34, width=min(shutil.get_terminal_size((120, 24)).columns, 120) - 2)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if action.option_strings and action.metavar:
            return f"{action.dest}={action.metavar}"
        return super()._format_action_invocation(action)


def _flags(name: str, field: dataclasses.Field) -> list[str]:
    dashed = [f"--{name.replace('_', '-')}"] if "_" in name else []
    return [f"--{name}", *dashed, *field.metadata["flags"]]


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _base_type(kind: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def _optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def _metavar(field: dataclasses.Field, kind: Any) -> str:
    base = _base_type(kind)
    if field.metadata.get("metavar"):
        return field.metadata["metavar"]
    if typing.get_origin(base) is Literal:
        return "|".join(str(choice) for choice in typing.get_args(base))
    return METAVARS[base]


def _range_text(meta: typing.Mapping) -> str | None:
    low, high = meta.get("minimum"), meta.get("maximum")
    if meta.get("range_text") or (low is None and high is None):
        return meta.get("range_text")
    if high is None:
        return f"at least {low}"
    return f"at most {high}" if low is None else f"{low} to {high}"


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _shown_default(field: dataclasses.Field, kind: Any) -> str:
    if _required(field) or field.default is None:
        return _metavar(field, kind)
    return _shown(field.default)


def _help_line(field: dataclasses.Field) -> str:
    meta = field.metadata
    if _required(field):
        default = "required"
    elif meta["default_text"]:
        default = f"default: {meta['default_text']}"
    else:
        default = "default: none" if field.default is None else f"default: {_shown(field.default)}"
    limits = _range_text(meta)
    # argparse expands %-formats in help; a literal % in a description must not break --help.
    return f"{meta['help']} ({f'{limits}; ' if limits else ''}{default})".replace("%", "%%")


def _convert(raw: str, kind: Any, field: dataclasses.Field) -> Any:
    """One command-line string as the field's type; anything else is one line with an example of a good value."""
    key, base = field.name, _base_type(kind)
    if raw == "" and _optional(kind):
        return None
    if typing.get_origin(base) is Literal:
        choices = [str(choice) for choice in typing.get_args(base)]
        if raw not in choices:
            raise UserError(f"{key}={raw} is not known; use one of {', '.join(choices)}")
        return raw
    if base is bool:
        if raw.lower() not in ("true", "false"):
            raise UserError(f"{key}={raw!r} is not true or false; e.g. {key}=true")
        return raw.lower() == "true"
    if base in (int, float):
        try:
            value = base(raw)
        except ValueError:
            example = field.default if isinstance(field.default, (int, float)) else field.metadata["minimum"] or 1
            raise UserError(f"{key}={raw!r} is not {KIND_NAMES[base]}; e.g. {key}={example}") from None
        low, high = field.metadata["minimum"], field.metadata["maximum"]
        if (low is not None and value < low) or (high is not None and value > high):
            raise UserError(f"{key}={raw} must be {_range_text(field.metadata)}")
        return value
    return base(raw)  # str or Path
