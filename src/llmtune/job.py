"""One Hydra job around run(): its status on disk, its resolved config, and what a failure does.

Every run directory gets `config.yaml` (resolved, secrets masked) and `status.json` before any work starts, so
`llmtune report` can list a failed or killed job next to the finished ones. In a multirun a failed job is recorded
and the next job starts; llmtune.multirun then lists the failed jobs and the command exits non-zero.
"""

import errno
import gc
import logging
import traceback
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from llmtune.console import quiet_libraries
from llmtune.errors import UserError
from llmtune.files import write_atomic
from llmtune.run_state import check_same_run, now, write_status
from llmtune.tracking import finish_wandb, mask_secrets, public_config, secret_values

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig) -> float | None:
    quiet_libraries()  # Hydra has set up logging by now: Lightning's records go through its handlers, once
    # Heavy imports (torch, transformers) only when a job really runs.
    from llmtune.run import run
    from llmtune.training.distributed import is_rank_zero, log_peak_memory, one_job

    if not is_rank_zero():  # another rank of a distributed run: it trains its shard, rank 0 owns the run folder
        run(cfg)
        log_peak_memory()
        return None
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A rerun into a run folder continues that run, never another.
    check_same_run(run_dir, public_config(cfg), _job_overrides())
    started = now()
    write_status(run_dir, "running", started)
    _mask_secrets_in_hydra_files(cfg, run_dir)
    try:
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(public_config(cfg), sort_keys=False))
        with one_job(_job_overrides(), str(run_dir.resolve())):
            value = run(cfg)
    except Exception as error:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:  # the machine's problem, not a bug: one line
            error = UserError(f"no space left on the device of {run_dir} ({error.filename or 'writing outputs'}): "
                              "free space there or move the run with hydra.run.dir=DIR, then rerun to resume")
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        first_line = message.strip().splitlines()[0]
        write_status(run_dir, "failed", started, first_line)
        finish_wandb(exit_code=1)
        if not _in_multirun():
            if isinstance(error, UserError):
                raise error from None  # one line (report_user_errors)
            raise  # anything else is a bug: show it
        # The traceback goes to the job's log file; the console gets one line and the sweep goes on.
        if isinstance(error, UserError):
            log.error("job failed: %s", message)
        else:
            log.error("job failed: %s\n%s", message, traceback.format_exc())
        return None
    except BaseException:  # Ctrl-C, kill: the job did not finish, and the sweep stops too
        write_status(run_dir, "failed", started, "interrupted")
        finish_wandb(exit_code=1)
        raise
    finally:
        # The model, trainer and module reference each other; without a full collection a multirun would hold the
        # previous job's model while the next one loads (measured in benchmarks/README.md).
        gc.collect()
    write_status(run_dir, "completed", started)
    log_peak_memory()
    finish_wandb()
    return value


def _mask_secrets_in_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra copies the command line into .hydra/ (and multirun.yaml); a token given there must not stay on disk."""
    secrets = secret_values(cfg)
    if not secrets:
        return
    files = list((run_dir / ".hydra").glob("*.yaml"))
    if _in_multirun():
        files.append(Path(HydraConfig.get().sweep.dir) / "multirun.yaml")
    for path in files:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if mask_secrets(text, secrets) != text:
                write_atomic(path, mask_secrets(text, secrets))


def _job_overrides() -> list[str]:
    """This job's own command-line overrides (in a multirun: its point of the grid)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
