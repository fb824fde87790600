"""`python -m llmtune` and the `llmtune` console script.

    llmtune [HYDRA OVERRIDES...]          one run (or a grid with -m); run.py tells the run
    llmtune sweep SPEC --count N [...]    a W&B sweep spec run locally (llmtune.sweep)
    llmtune report DIR [...]              one report across runs (llmtune.report.compare)
    llmtune serve RUN_DIR [key=value...]  a finished run behind an OpenAI-compatible HTTP API (llmtune.serve)
    llmtune export RUN_DIR format=...     merged / GGUF / Ollama, checked against the run (llmtune.export.cli)
    llmtune predict RUN_DIR input=FILE    batch predictions from a file or stdin (llmtune.predict)
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from llmtune.config import CONFIG_DIR, check_overrides, register_resolvers
from llmtune.errors import report_user_errors

register_resolvers()
# bitsandbytes (imported by PEFT) warns at import, on every command, that the optional `kernels` package is missing;
# its own CPU kernels work without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_user_errors
def train(cfg: DictConfig) -> float | None:
    from llmtune.job import run_job

    return run_job(cfg)


# `llmtune COMMAND ...`: the module whose main(argv) runs it; anything else is a (multi)run's Hydra overrides.
COMMANDS = {"sweep": "llmtune.sweep", "report": "llmtune.report.compare", "export": "llmtune.export.cli",
            "predict": "llmtune.predict", "serve": "llmtune.serve"}


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in COMMANDS:
        import importlib

        return report_user_errors(importlib.import_module(COMMANDS[command]).main)(sys.argv[2:])
    report_user_errors(check_overrides)(sys.argv[1:])
    train()
    # Filled only by a multirun, where a failed job does not stop the grid.
    from llmtune.job import failed_jobs

    if failed_jobs:
        print(f"llmtune: error: {len(failed_jobs)} job(s) failed; the others finished:", file=sys.stderr)
        for line in failed_jobs:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
