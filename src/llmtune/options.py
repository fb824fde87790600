"""`key=value` options for the commands that act on a finished run (export, predict, serve), Hydra-style."""

from llmtune.errors import UserError


def parse_options(args: list[str], defaults: dict, command: str) -> dict:
    """Each `key=value` overrides the default of that key, converted to the default's type (int, float, bool, str;
    a None default takes the string). Anything else is one error line listing the keys the command takes."""
    accepted = ", ".join(f"{key}={value}" for key, value in defaults.items())
    options = dict(defaults)
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in defaults:
            raise UserError(f"llmtune {command}: unknown option {arg!r}; options are {accepted}")
        options[key] = _typed(value, defaults[key], key, command)
    return options


KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def _typed(value: str, default, key: str, command: str):
    kind = type(default)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError
            return value.lower() == "true"
        return value if default is None else kind(value)
    except ValueError:
        raise UserError(f"llmtune {command}: {key}={value!r} is not {KIND_NAMES[kind]}; e.g. {key}={default}") from None
