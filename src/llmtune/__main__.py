"""`python -m llmtune` and the `llmtune` console script: Hydra entry only; run.py tells the run."""

import sys

import hydra
from omegaconf import DictConfig

from llmtune.config import CONFIG_DIR, check_overrides, register_resolvers
from llmtune.errors import report_user_errors

register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_user_errors
def train(cfg: DictConfig) -> float | None:
    from llmtune.run import run  # heavy imports (torch, transformers) only when a job really runs

    return run(cfg)


def main() -> None:
    report_user_errors(check_overrides)(sys.argv[1:])
    train()


if __name__ == "__main__":
    main()
