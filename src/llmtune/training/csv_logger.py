"""Lightning's CSVLogger, kept across attempts: a run continued in its folder (resume=RUN_DIR, or a rerun after a
crash) appends its rows to logs/metrics.csv, where Lightning's own writer deletes the earlier attempt's file."""

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class ContinuedExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an earlier attempt's metrics.csv, and its columns, so this attempt's rows go below them."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class ContinuedCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuedExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedExperimentWriter(log_dir=self.log_dir)
        return self._experiment
