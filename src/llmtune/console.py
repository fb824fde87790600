"""A quiet, useful console: library noise nobody can act on is filtered at its source, each log message is printed
once, and progress reaches a log file (stdout not a terminal: a batch job, SLURM, `> run.log`) as plain lines.

Cheap to import (no torch, no Lightning), so every command can call quiet_libraries() first thing.
"""

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

# Deprecations raised inside the libraries, about calls the libraries (or llmtune's pinned usage) make, never about
# anything a user wrote: (message regex, category, module regex of where the warning is raised).
LIBRARY_WARNINGS = (
    # transformers 5 renamed the forward argument past_key_values to cache; the warning is raised from whichever layer
    # of the model forwards it, so it is matched by its text alone.
    (r"`past_key_values` is deprecated", FutureWarning, ""),
    # PEFT reads model.is_gradient_checkpointing, which transformers 5 renamed is_activation_checkpointing.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\."),
    # Lightning's own pytree helper builds a LeafSpec, which torch 2.13 deprecated.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    # torch.utils.mkldnn defines TorchScript methods when it is imported.
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning, r"torch\.jit"),
)
# Log records of the same kind: (logger, text in the message).
LIBRARY_LOG_LINES = (
    # Lightning's advertisement for its cloud logger, at every fit.
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),
    # transformers' logged twin of the past_key_values FutureWarning above, for the name on a model's output.
    ("transformers.utils.generic", "`past_key_values`/`cache_params` are deprecated"),
)
# Seconds between two plain progress lines (training, scoring) when stdout is not a terminal.
PROGRESS_ENV = "LLMTUNE_PROGRESS_EVERY_S"


def quiet_libraries() -> None:
    """Install the filters above and, inside a Hydra job (Hydra has set up logging), route Lightning's log records
    through Hydra's handlers. Idempotent: a process calls it at start and each job again."""
    import warnings

    from hydra.core.hydra_config import HydraConfig

    for message, category, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, _ in LIBRARY_LOG_LINES:
        logging.getLogger(name).addFilter(_not_library_noise)  # the same function each time: added once
    if not sys.stderr.isatty():
        # Hugging Face's weight loading/saving bars take under a second here, and in a log file each is a line of
        # carriage returns; read by huggingface_hub at its import, hence before any model code runs.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if HydraConfig.initialized() and logging.getLogger().handlers:
        _lightning_through_root()


def _not_library_noise(record: logging.LogRecord) -> bool:
    return not any(record.name == name and text in record.getMessage() for name, text in LIBRARY_LOG_LINES)


def _lightning_through_root() -> None:
    """Lightning gives its loggers a stderr handler of their own when imported, and their records also reach the root
    logger, where Hydra's console and job-file handlers are: every INFO line printed twice. With the root configured,
    Lightning's own handlers go, so each record is printed once and also lands in the job's log file."""
    import lightning  # noqa: F401  (adds its handlers; a job imports it next anyway)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:  # not a FileHandler
            logger.removeHandler(handler)
        logger.propagate = True


def progress_every_s() -> float:
    return float(os.environ.get(PROGRESS_ENV, "30"))


def clock(seconds: float) -> str:
    """1:05:09, 4:07 or 0:09."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Every:
    """True when at least `seconds` have passed since it last was (or since it was made)."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.monotonic()

    def __call__(self) -> bool:
        if time.monotonic() - self.last < self.seconds:
            return False
        self.last = time.monotonic()
        return True


def progress(items: Iterable, total: int, desc: str, unit: str) -> Iterator:
    """items with a progress display: tqdm's bar on a terminal; otherwise a plain line at most every
    LLMTUNE_PROGRESS_EVERY_S seconds and one at the end, rather than a log file line of carriage returns."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False)
        return
    started, due, done = time.monotonic(), Every(progress_every_s()), 0
    for item in items:
        yield item
        done += 1
        if due() and done < total:
            elapsed = time.monotonic() - started
            print(f"{desc}: {done}/{total}, {clock(elapsed)} elapsed, ETA {clock(elapsed / done * (total - done))}",
                  file=sys.stderr, flush=True)
    print(f"{desc}: {done}/{total} in {clock(time.monotonic() - started)}", file=sys.stderr, flush=True)
