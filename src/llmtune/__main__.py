"""`python -m llmtune` and the `llmtune` console script: `llmtune --help` lists what it does.

A run (or with -m a grid of runs) is configured by Hydra overrides and told by run.py; every other command is
`llmtune COMMAND [ARGS] [key=value ...]`, its module's main(argv), with options parsed by llmtune.cli.
"""

import difflib
import logging
import re
import sys
from pathlib import Path
from typing import NamedTuple

import hydra
import yaml
from omegaconf import DictConfig

from llmtune.config import CONFIG_DIR, check_overrides, check_values, register_resolvers
from llmtune.console import quiet_libraries
from llmtune.errors import UserError, report_user_errors
from llmtune.training.distributed import relaunched_argv

quiet_libraries()  # library deprecation noise filtered for the whole process, before anything imports them
register_resolvers()
# bitsandbytes (imported by PEFT) warns at import, on every command, that the optional `kernels` package is missing;
# its own CPU kernels work without it. Where `kernels` is installed (transformers 5.25 requires it), it warns instead
# that offline mode skips its publisher check for bitsandbytes' kernel: one line per command, not the user's concern.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_user_errors
def train(cfg: DictConfig) -> float | None:
    from llmtune.job import run_job

    return run_job(cfg)


class Command(NamedTuple):
    module: str  # its main(argv) runs the command; imported only when used, so `llmtune --help` stays fast
    summary: str


COMMANDS = {
    "sweep": Command("llmtune.sweep", "run a W&B sweep spec on this machine, one run per trial"),
    "report": Command("llmtune.report.compare", "compare runs: ranking, seeds, significance, figures"),
    "export": Command("llmtune.export.cli", "ship a finished run as merged / GGUF / Ollama, checked against the run"),
    "predict": Command("llmtune.predict", "batch predictions with a finished run, from a CSV / JSONL file or stdin"),
    "serve": Command("llmtune.serve", "a finished run behind an OpenAI-compatible HTTP API"),
    "synth": Command("llmtune.synth.cli", "a dataset written by a teacher LLM: Q&A from documents, labelled texts"),
}
HELP_FLAGS = ("-h", "--help")
# Hydra's help, reduced to its list of config groups (it knows every config folder on the search path).
CONFIG_GROUPS_ONLY = "hydra.help.template=$APP_CONFIG_GROUPS"


def overview() -> str:
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())
    return f"""usage: llmtune [OVERRIDE ...] [-m]        one run, or with -m a grid of runs
       llmtune COMMAND [ARGS] [OPTIONS]  llmtune COMMAND --help lists its arguments and options

Commands (options are key=value; --key=value and --key value work too):
{commands}

A run is configured by Hydra overrides (group=option, key.path=value; -m and a,b,c for a grid):
  llmtune model=tiny method=causal trainer.max_epochs=1
  llmtune -m method=instruct,causal rag=false,true
  llmtune --cfg job [OVERRIDE ...]   the composed config, without running
  llmtune --hydra-help               Hydra's own flags

Config groups (group=option):"""


def main() -> None:
    # A rank that Lightning started on this machine runs the job that started it (training.distributed).
    argv = relaunched_argv(sys.argv[1:])
    first = argv[0] if argv else ""
    if first in COMMANDS:
        import importlib

        return report_user_errors(importlib.import_module(COMMANDS[first].module).main)(argv[1:])
    if any(arg in HELP_FLAGS for arg in argv):
        print(overview(), flush=True)
        sys.argv = [sys.argv[0], "--help", CONFIG_GROUPS_ONLY, *(arg for arg in argv if arg not in HELP_FLAGS)]
        train()  # prints the config groups and exits 0
    report_user_errors(check_unknown_command)(first)
    argv = report_user_errors(resumed_overrides)(argv)
    report_user_errors(check_overrides)(argv)
    report_user_errors(check_values)(argv)
    sys.argv = [sys.argv[0], *argv]
    train()
    # Filled only by a multirun, where a failed job does not stop the grid.
    from llmtune.multirun import failed_jobs

    if failed_jobs:
        print(f"llmtune: error: {len(failed_jobs)} job(s) failed; the others finished:", file=sys.stderr)
        for line in failed_jobs:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)


def resumed_overrides(argv: list[str]) -> list[str]:
    """`resume=RUN_DIR`: that run's own command-line overrides (.hydra/overrides.yaml) into its own folder, then any
    others given (e.g. trainer.max_epochs=4 to train longer); the run continues from its last checkpoint."""
    given = [arg for arg in argv if arg.startswith("resume=")]
    if not given:
        return argv
    run_dir = Path(given[-1].removeprefix("resume="))
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise UserError(f"resume={run_dir} is not a run folder (no .hydra/overrides.yaml): pass the folder a run wrote")
    given_now = [arg for arg in argv if not arg.startswith("resume=")]
    now_keys = {arg.split("=", 1)[0].lstrip("+~") for arg in given_now}
    earlier = [o for o in yaml.safe_load(saved.read_text(encoding="utf-8")) or []
               if o.split("=", 1)[0].lstrip("+~") not in now_keys]
    return [*earlier, *given_now, f"hydra.run.dir={run_dir}"]


def check_unknown_command(word: str) -> None:
    """A bare first word is no Hydra override (those hold '=', or start with '-', '+' or '~'): a mistyped command."""
    if re.fullmatch(r"[A-Za-z][\w-]*", word):
        close = difflib.get_close_matches(word, list(COMMANDS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown command {word!r}; {hint}commands are {', '.join(COMMANDS)}, and a run takes "
                        "key=value overrides (llmtune --help)")


if __name__ == "__main__":
    main()
