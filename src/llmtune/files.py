"""Every file and folder llmtune writes goes through here: written under a temporary name on the target's own
filesystem, flushed to disk, then renamed, so a crash or a full disk never leaves a half-written file under its real
name; and nothing a user made is overwritten or deleted.

Folders llmtune writes carry a marker file (OUTPUT_MARKER). `overwrite=true` replaces only such a folder, never a
folder the user made, the current directory or one of its parents.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from llmtune.errors import UserError

OUTPUT_MARKER = ".llmtune-output"  # in every folder llmtune wrote as a whole: the only folders it may replace


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Write text (UTF-8) or bytes to a temporary file beside `path`, fsync it, then rename it over `path`."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    write_atomic_with(path, lambda partial: partial.write_bytes(data))


def write_atomic_with(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(partial)` fills a temporary file beside `path` (e.g. a figure's savefig); it becomes `path` only once
    complete and on disk. On any failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a file name to write to")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from everyone else
    os.close(handle)
    partial = Path(name)
    try:
        write(partial)
        _fsync(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def check_output_folder(folder: str | Path, overwrite: bool, option: str = "out") -> None:
    """Refuse, before any work, a target folder that holds anything unless `overwrite` is set and llmtune wrote it;
    the current directory and its parents are never a target."""
    folder = Path(folder)
    resolved, here = folder.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(f"{option}={folder} is the current directory or one of its parents; an export replaces its "
                        f"target folder as a whole: give a new folder, e.g. {option}=export-out")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"{option}={folder} is a file, not a folder: give a new folder name")
    if not any(folder.iterdir()):
        return
    if not (folder / OUTPUT_MARKER).is_file():
        raise UserError(f"{option}={folder} already holds files llmtune did not write; it is never replaced: give a "
                        "new or empty folder")
    if not overwrite:
        raise UserError(f"{option}={folder} already holds an earlier llmtune output: pass overwrite=true to replace "
                        "it, or give another folder")


@contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False, what: str = "") -> Iterator[Path]:
    """Yield an empty staging folder beside `folder`; when the block succeeds it becomes `folder` (marked as
    llmtune's), replacing an earlier llmtune output there only with `overwrite`. On failure the staging folder goes
    away and `folder` is untouched."""
    folder = Path(folder)
    check_output_folder(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make an export unreadable to other users
    try:
        yield staging
        (staging / OUTPUT_MARKER).write_text(json.dumps(
            {"what": what, "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")
        for path in staging.rglob("*"):
            if path.is_file():
                _fsync(path)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it, so set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_folder(staging: Path, folder: Path) -> None:
    check_output_folder(folder, overwrite=True)  # again: something may have appeared there while we worked
    if folder.exists():  # an earlier llmtune output (checked above): moved aside first, removed once replaced
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
        os.replace(folder, old / folder.name)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)
    _fsync_folder(folder.parent)


def same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    """The rename itself reaches the disk only once its folder is synced (POSIX; a no-op where it is not allowed)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
