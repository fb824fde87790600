"""The out= folder of `llmtune synth`: the settings it was started with (synth.json), and the progress log
(progress.jsonl), one line per answered work item, appended and fsync'ed as each reply arrives, so a crash or a kill
loses at most the requests in flight and a rerun asks only for what is missing."""

import fcntl
import json
import os
from pathlib import Path

from llmtune.errors import UserError
from llmtune.files import write_atomic

SETTINGS_FILE = "synth.json"
PROGRESS_FILE = "progress.jsonl"


def check_out_folder(out: Path) -> bool:
    """True when out= holds an earlier synth of which this run is a continuation; False for a new or empty folder.
    A file, or a folder holding anything synth did not write, is refused: synth never writes among a user's files."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"out={out} is a file, not a folder: give a new folder for the dataset")
    if (out / SETTINGS_FILE).is_file():
        return True
    if any(out.iterdir()):
        raise UserError(f"out={out} already holds files that llmtune synth did not write (no {SETTINGS_FILE}); "
                        "give a new or empty folder")
    return False


class SynthFolder:
    """out/ opened for this run: its settings checked against the earlier run's, the log read, and a lock held so
    that two synth processes never append to one log."""

    def __init__(self, out: Path, settings: dict):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(out, os.O_RDONLY)  # the folder itself: locked before anything in it is read or written
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._check_settings(settings)
        except BlockingIOError:
            os.close(self._lock)
            raise UserError(f"another llmtune synth is writing to out={out}; let it finish, or give another out=") \
                from None
        except BaseException:
            os.close(self._lock)
            raise
        self.log_path = out / PROGRESS_FILE
        self._log = open(self.log_path, "a+b")
        self.done = self._read_log()

    def _check_settings(self, settings: dict) -> None:
        path = self.out / SETTINGS_FILE
        if not path.is_file():
            write_atomic(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
            return
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path} is damaged, so out={self.out} cannot be continued; give a new out=") from None
        changed = [key for key in sorted(set(settings) | set(earlier)) if settings.get(key) != earlier.get(key)]
        if changed:
            raise UserError(f"out={self.out} was started with other settings (changed: {', '.join(changed)}; the "
                            f"earlier ones are in {path}): rerun with those to continue it, or give a new out=")

    def _read_log(self) -> dict[str, dict]:
        """{work item: its stored value}. A last line cut short by a kill is dropped (that item is asked again) and
        cut off the file, so the next line appended starts on a line of its own."""
        self._log.seek(0)
        data = self._log.read()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            self._log.truncate(len(complete))
        done = {}
        for line in complete.splitlines():
            try:
                record = json.loads(line)
                done[record["item"]] = record["value"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                continue  # a damaged line: that item is asked again
        return done

    def append(self, item: str, value: dict) -> None:
        """One answered work item, on disk before the next is recorded."""
        line = json.dumps({"item": item, "value": value}, ensure_ascii=False) + "\n"
        self._log.write(line.encode("utf-8"))
        self._log.flush()
        os.fsync(self._log.fileno())
        self.done[item] = value

    def close(self) -> None:
        self._log.close()
        os.close(self._lock)  # releases the lock
