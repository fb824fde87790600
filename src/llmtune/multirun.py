"""The jobs of a multirun that failed, wherever the launcher ran them (in this process, or in processes of Hydra's
submitit launcher on this machine or a SLURM cluster): read from their status.json once the grid has finished, so the
command exits 1 and lists them."""

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

failed_jobs: list[str] = []  # "<run dir>: <error>" for each failed job of the multirun this process launched


class CollectFailedJobs(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        for status_file in sorted(Path(config.hydra.sweep.dir).glob("*/status.json")):
            try:
                status = json.loads(status_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if status.get("status") == "failed":
                failed_jobs.append(f"{status_file.parent}: {status.get('error')}")
