"""A run folder's state across processes: status.json (corrected when its process died), the checkpoint a rerun into
the same folder continues from, and results kept so a resumed run does not redo them."""

import errno
import json
import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import yaml

from llmtune.errors import UserError
from llmtune.files import write_atomic

log = logging.getLogger(__name__)

# Settings a resumed run may change: how long it trains, how its checkpoints are saved and where it logs (a key ending
# in "." stands for every key under it). Anything else would mix two runs in one folder.
RESUMABLE_CHANGES = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "callbacks.checkpoint.", "logger.")
# What a run writes once it has done work (checkpoints aside): a folder holding none of them holds nothing to continue.
WORK_PRODUCTS = ("base_predictions.jsonl", "adapter", "model", "predictions.jsonl", "metrics.json")


def write_status(run_dir: Path, status: str, started: str, error: str | None = None) -> None:
    record = {"status": status, "error": error, "started": started,
              "finished": None if status == "running" else now(), "pid": os.getpid(), "host": socket.gethostname()}
    text = json.dumps(record, indent=2) + "\n"
    try:
        write_atomic(run_dir / "status.json", text)
    except OSError as error:
        if error.errno != errno.ENOSPC or not (run_dir / "status.json").is_file():
            raise
        # A full disk has no room for a second copy; the file's own blocks do: "failed" must reach it.
        with open(run_dir / "status.json", "r+", encoding="utf-8") as handle:
            handle.truncate(0)
            handle.write(text)


def read_status(run_dir: Path) -> dict | None:
    """status.json; a "running" run whose process is gone (kill -9, a lost node) is corrected to "killed" on disk."""
    path = run_dir / "status.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("status") == "running" and record.get("host") == socket.gethostname() and record.get("pid") \
            and not _alive(record["pid"]):
        checkpoint = last_checkpoint(run_dir)
        record.update(status="killed", finished=None, error=(
            f"process {record['pid']} ended without finishing; "
            + (f"rerun with resume={run_dir} to continue from {checkpoint.name}" if checkpoint else
               "no checkpoint was written: rerun it")))
        write_atomic(path, json.dumps(record, indent=2) + "\n")
    return record


def last_checkpoint(run_dir: Path) -> Path | None:
    """What a rerun into this folder continues from: checkpoints/last.ckpt, or the newest step=N.ckpt where last.ckpt
    could not be written (a full disk)."""
    folder = run_dir / "checkpoints"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    steps = sorted(folder.glob("step=*.ckpt"), key=lambda p: int(p.stem.removeprefix("step=")))
    return steps[-1] if steps else None


def check_same_run(run_dir: Path, config: dict, given: list[str] = ()) -> None:
    """A folder with an earlier attempt is continued only by the same run (its config.yaml, but for RESUMABLE_CHANGES);
    anything else would write two runs' outputs and checkpoints into one folder. An earlier attempt that left no work
    behind (refused before it trained or scored: a missing file, a value Lightning refuses) binds nothing, so the
    corrected command can run in the same folder. Settings one side lacks come from another llmtune version (a run
    started before an upgrade): they do not bind, unless the command line (given: its overrides) names them."""
    path = run_dir / "config.yaml"
    if not path.is_file() or not left_work(run_dir):
        return
    earlier, now_flat = _flat(yaml.safe_load(path.read_text(encoding="utf-8")) or {}), _flat(config)
    # A run folder moved or copied since (another machine, a renamed folder): its own paths follow it.
    moved_from, moved_to = earlier.get("paths.output_dir"), now_flat.get("paths.output_dir")
    if isinstance(moved_from, str) and isinstance(moved_to, str) and moved_from != moved_to:
        earlier = {key: value.replace(moved_from, moved_to) if isinstance(value, str) else value
                   for key, value in earlier.items()}
    named = {arg.split("=", 1)[0].lstrip("+~") for arg in given}
    versioned = {key for key in set(earlier) ^ set(now_flat)
                 if not any(key == name or key.startswith(name + ".") for name in named)}
    changed = sorted(key for key in set(earlier) | set(now_flat)
                     if earlier.get(key) != now_flat.get(key) and not _resumable(key) and key not in versioned)
    if changed:
        shown = ", ".join(f"{k}: {earlier.get(k)!r} -> {now_flat.get(k)!r}" for k in changed[:3])
        raise UserError(f"{run_dir} holds a run with other settings ({shown}{', ...' if len(changed) > 3 else ''}); "
                        "a rerun into a run folder continues that run: use a new folder, or the same settings")
    if versioned:
        added, dropped = sorted(versioned - set(earlier)), sorted(versioned - set(now_flat))
        log.warning("%s was started by another llmtune version; continuing it%s%s", run_dir,
                    f" with the settings it lacked at their defaults ({', '.join(added)})" if added else "",
                    f", without settings this version no longer has ({', '.join(dropped)})" if dropped else "")


def _resumable(key: str) -> bool:
    """A change a resumed run may make: RESUMABLE_CHANGES, or its own paths (a moved folder)."""
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
               for allowed in (*RESUMABLE_CHANGES, "paths."))


def left_work(run_dir: Path) -> bool:
    """Whether an attempt in run_dir got as far as results: a checkpoint, the base model's scores, weights, metrics."""
    return last_checkpoint(run_dir) is not None or any((run_dir / name).exists() for name in WORK_PRODUCTS)


def cached(path: Path, compute: Callable[[], list[dict] | None]) -> list[dict] | None:
    """compute()'s records, kept in path (JSONL) so a resumed run reads them instead of computing them again."""
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = compute()
    if records is not None:
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
