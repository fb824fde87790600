"""The console of a run whose output goes to a file: each line once, no library deprecation noise, plain progress."""

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

from llmtune.config import CONFIG_DIR
from llmtune.console import progress, quiet_libraries


def test_tiny_job_log_file(tmp_path, cache_dir):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    # Interval 0: a progress line after every batch, so the periodic lines show up in a job this short.
    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "LLMTUNE_PROGRESS_EVERY_S": "0"}
    with log.open("w") as out:  # stdout and stderr to one file, as `> run.log 2>&1`
        result = subprocess.run([sys.executable, "-m", "llmtune", "model=tiny", "trainer.max_epochs=1",
                                 "dataset.split.train_per_class=10", "dataset.split.val_per_class=2",
                                 "dataset.split.test_per_class=5", f"hydra.run.dir={run_dir}"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(CONFIG_DIR).parent,
                                timeout=600, check=False)
    text = log.read_text(encoding="utf-8")
    assert result.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.strip()]
    assert [line for line, n in Counter(lines).items() if n > 1] == []
    for noise in ("Warning", "deprecated", "litlogger", "\r"):
        assert noise not in text, noise
    assert sum(line.startswith("train: epoch 1/1, step ") for line in lines) >= 2, text  # periodic + epoch end
    assert any(line.startswith("train: ") and "val loss" in line and "tokens/s" in line for line in lines)
    assert any(re.fullmatch(r"scoring base model: (\d+)/\1 in \d+:\d\d", line) for line in lines), text
    # Lightning's INFO lines: once on the console, once in the job's log file.
    (job_log,) = run_dir.glob("*.log")
    for where in (text, job_log.read_text(encoding="utf-8")):
        assert where.count("`Trainer.fit` stopped") == 1


def test_library_deprecations_are_filtered_and_others_kept(caplog):
    quiet_libraries()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning,
                               "module.py", 1, module="torch.nn.modules.module")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "mine.py", 1,
                               module="mine")  # the same words from the user's own code still show
    assert [str(w.message) for w in caught] == ["`is_gradient_checkpointing` is deprecated"]
    with caplog.at_level(logging.INFO):
        tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        tips.info("Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        tips.info("GPU available: False, used: False")
    assert caplog.messages == ["GPU available: False, used: False"]


def test_progress_off_a_terminal_is_plain_lines(monkeypatch):
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("LLMTUNE_PROGRESS_EVERY_S", "0")
    assert list(progress(range(3), 3, "scoring", unit="batch")) == [0, 1, 2]
    lines = err.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines[:2]] == ["scoring: 1/3", "scoring: 2/3"]
    assert "ETA" in lines[0] and lines[-1].startswith("scoring: 3/3 in ") and len(lines) == 3
