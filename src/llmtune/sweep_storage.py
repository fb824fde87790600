"""`llmtune sweep SPEC --storage URL`: sweep workers, on one machine or many, share one Optuna study in a database
(Optuna's RDB storage), so that together they run each trial once.

- The first worker creates the study (named by --study), enqueues a grid's points (only it does, so each point is
  queued once) and then stores the sweep's identity (spec, overrides, search seed, count, folder) as a study user
  attr. That attr, written last, also tells joining workers that the queue is complete; they check it is their sweep.
- Trial numbers come from the storage, so trial folders (numbered) never collide. What sweep.json needs of a trial
  beyond Optuna's own state and value (params, folder, error, seconds, worker) is stored as trial user attrs, so any
  worker rebuilds the whole record.
- A running trial records Optuna's heartbeat. One silent for GRACE_S (its worker was killed or its machine went away)
  is marked failed by the next worker that looks for a trial, and a grid queues its point again (Optuna's
  RetryHeartbeatStaleTrialCallback), so the grid is still completed.
- SQLite: Python's sqlite3 begins a transaction only at the first write, so two workers could both read a queued
  trial as WAITING and both claim it. Here every transaction begins with BEGIN IMMEDIATE (SQLAlchemy's documented
  recipe), which serialises them; PostgreSQL locks the row itself (Optuna's SELECT ... FOR UPDATE).
"""

import fcntl
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, Trial, TrialState

from llmtune.errors import UserError
from llmtune.files import write_atomic

HEARTBEAT_S = 60  # a running trial's worker writes a heartbeat this often...
GRACE_S = 180  # ...and a trial without one for this long counts as lost
JOIN_WAIT_S = 60.0  # how long a joining worker waits for the creator to finish enqueueing
SWEEP_ATTR = "llmtune_sweep"  # the study user attr holding the sweep's identity and folder
LOST = "its worker stopped sending heartbeats (killed, or its machine went away)"
EXAMPLES = "sqlite:///PATH/study.db (one machine) or postgresql://USER@HOST:PORT/DB (a cluster)"
# Fail fast on an unreachable server; wait for a busy SQLite file (another worker writing) instead of failing, and
# leave BEGIN to _begin_immediate (isolation_level None: sqlite3 itself never begins a transaction).
CONNECT_ARGS = {"postgresql": {"connect_timeout": 10}, "sqlite": {"timeout": 60, "isolation_level": None}}
WORKER = f"{socket.gethostname()}:{os.getpid()}"


# --- The database ---------------------------------------------------------------------------------------------------

def open_storage(url: str, retry_lost_trials: bool) -> RDBStorage:
    """The study database, reached now (before any trial starts), or one UserError line naming the fix."""
    shown = masked(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UserError(f"--storage {shown} is not a database URL; use {EXAMPLES}") from None
    backend = parsed.get_backend_name()
    if parsed.drivername == "postgresql" and not find_spec("psycopg") and find_spec("psycopg2"):
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; llmtune installs psycopg2-binary.
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UserError(f"--storage {shown} is an in-memory database, which other workers cannot see; give a file: "
                        "sqlite:///PATH/study.db, or leave out --storage for a sweep in one process")
    # Optuna's heartbeat and retry are experimental in 5.1 and warn at every use, and every ask warns that heartbeats
    # are meant for study.optimize: this worker runs the heartbeat itself (heartbeat() below).
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    try:
        storage = _connect(url, backend, retry_lost_trials)
    except sqlalchemy.exc.NoSuchModuleError:
        raise UserError(f"--storage {shown}: unknown database {parsed.drivername!r}; use {EXAMPLES}") from None
    except ImportError as error:  # Optuna's wrapper of a missing driver module; the module's name is in the cause
        missing = getattr(error.__cause__, "name", None) or "its driver"
        raise UserError(f"--storage {shown}: its database driver ({missing}) is not installed; pip install it "
                        f"(psycopg2-binary for postgresql://), or use {EXAMPLES}") from None
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = _first_line(getattr(error, "orig", None) or error)
        raise UserError(f"--storage {shown}: cannot reach the database ({reason}); check the URL, that the server "
                        f"is up and the folder exists") from None
    except RuntimeError as error:  # Optuna: the tables were made by an incompatible Optuna version
        raise UserError(f"--storage {shown}: {_first_line(error)}") from None
    if backend == "sqlite":
        sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
    return storage


def _connect(url: str, backend: str, retry_lost_trials: bool) -> RDBStorage:
    """Optuna's RDBStorage with heartbeats. Workers starting together on a new database may race to create its
    tables (the loser gets "already exists"): two such failures are tried again; a third is the one reported."""
    def storage() -> RDBStorage:
        return RDBStorage(url, engine_kwargs={"connect_args": CONNECT_ARGS.get(backend, {})},
                          heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback() if retry_lost_trials
                          else None)

    for attempt in range(2):
        try:
            return storage()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            time.sleep(0.5 * (attempt + 1))
    return storage()


def _begin_immediate(connection: sqlalchemy.Connection) -> None:
    """Take SQLite's write lock at the start of every transaction (read-then-claim becomes atomic)."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def masked(url: str) -> str:
    """The URL without its password, for messages and sweep.json."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --- The study ------------------------------------------------------------------------------------------------------

def create_or_join(storage: RDBStorage, name: str, direction: str, identity: dict, sweep_dir: Path | None,
                   default_dir: Path, sampler: Callable[[bool], optuna.samplers.BaseSampler],
                   enqueue: Callable[[optuna.Study], None]) -> tuple[optuna.Study, Path]:
    """This worker's handle on the study, and the sweep's folder: created with `enqueue`d trials when it is new,
    else checked to be the same sweep. `sampler(created)` gives the sampler; `identity` is compared as JSON."""
    identity = _as_json(identity)
    folder = (sweep_dir or default_dir).resolve()
    if name not in optuna.get_all_study_names(storage) and (folder / "sweep.json").exists():
        raise UserError(f"{folder} already holds a sweep (sweep.json) that is not study {name}: choose another --dir")
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler(True))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler(False))
        return study, _joined_folder(study, name, identity, sweep_dir)
    enqueue(study)
    study.set_user_attr(SWEEP_ATTR, {**identity, "dir": str(folder)})  # last: the sweep is ready to join
    return study, folder


def _joined_folder(study: optuna.Study, name: str, identity: dict, sweep_dir: Path | None) -> Path:
    stored = _stored_identity(study, name)
    differ = [key for key in identity if stored.get(key) != identity[key]]
    if differ:
        raise UserError(f"study {name} holds another sweep (its {', '.join(differ)} differ): join it with the same "
                        f"spec, overrides, --seed and --count as its first worker, or start a new one with "
                        f"--study NEW_NAME")
    folder = Path(stored["dir"])
    if sweep_dir is not None and sweep_dir.resolve() != folder:
        raise UserError(f"study {name} keeps its trials in {folder}: leave out --dir (or pass that folder), or start "
                        f"a new sweep in {sweep_dir} with --study NEW_NAME")
    return folder


def _stored_identity(study: optuna.Study, name: str) -> dict:
    """The creator's record of the sweep, once it has enqueued everything (it writes it last)."""
    deadline = time.monotonic() + JOIN_WAIT_S
    while SWEEP_ATTR not in (attrs := study.user_attrs):
        if time.monotonic() > deadline:
            raise UserError(f"study {name} exists but was not set up by llmtune sweep (or its first worker stopped "
                            f"while setting it up): start a new one with --study NEW_NAME")
        time.sleep(0.5)
    return attrs[SWEEP_ATTR]


def _as_json(value: Any) -> Any:
    """As the storage gives it back (tuples become lists, keys strings), so stored and given compare equal."""
    return json.loads(json.dumps(value, default=str))


# --- Taking trials --------------------------------------------------------------------------------------------------

def next_queued_trial(study: optuna.Study, distributions: dict) -> Trial | None:
    """A grid's next point, claimed by this worker alone; None when no point is left waiting."""
    optuna.storages.fail_stale_trials(study)  # a lost worker's point goes back in the queue first
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return None
    trial = _claim(study, distributions)  # pops a WAITING trial; creates a new one only if others took them all
    if _was_queued(study, trial.number):
        return trial
    _discard(study, trial)  # a sampled point is no grid point: never run it
    return None


def next_sampled_trial(study: optuna.Study, distributions: dict, count: int) -> Trial | None:
    """A random/bayes trial while the study has fewer than `count`; None once it has them (finished or running)."""
    optuna.storages.fail_stale_trials(study)
    if len(_counted(study)) >= count:
        return None
    trial = _claim(study, distributions)
    # Workers asking at once may all pass the check above. Trial numbers order them: trial n runs only if fewer than
    # `count` counted trials come before it (an undecided surplus one before it means this one is surplus too).
    if len([t for t in _counted(study) if t.number < trial.number]) >= count:
        _discard(study, trial)
        return None
    return trial


def _claim(study: optuna.Study, distributions: dict) -> Trial:
    """A new running trial with its first heartbeat already stored: Optuna never counts a trial without one as lost,
    and the heartbeat thread's first write may come too late for a worker killed early."""
    trial = study.ask(distributions)
    study._storage.record_heartbeat(trial._trial_id)
    return trial


def _was_queued(study: optuna.Study, number: int) -> bool:
    """An enqueued point (or a lost one queued again) carries its fixed params; a freshly sampled trial does not."""
    return any(t.number == number and "fixed_params" in t.system_attrs
               for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _counted(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING
            and not t.user_attrs.get("surplus")]


def _discard(study: optuna.Study, trial: Trial) -> None:
    """A trial asked for but never run: failed, and left out of the count and of sweep.json."""
    trial.set_user_attr("surplus", True)
    study.tell(trial, state=TrialState.FAIL)


@contextmanager
def heartbeat(study: optuna.Study, trial: Trial) -> Iterator[None]:
    """Optuna's heartbeat thread around the trial, as study.optimize runs it (ask/tell has no public hook for it)."""
    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def give_back(study: optuna.Study, trial: Trial, requeue: bool, reason: str) -> None:
    """This worker is stopping mid-trial (Ctrl-C, an exception): fail the trial now rather than after GRACE_S, and
    queue a grid point again, as for a lost worker."""
    trial.set_user_attr("error", reason)
    study.tell(trial, state=TrialState.FAIL)
    if requeue:
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        RetryHeartbeatStaleTrialCallback()(study, frozen)


# --- The record -----------------------------------------------------------------------------------------------------

STATUS = {TrialState.COMPLETE: "completed", TrialState.RUNNING: "running"}


def stored_trials(study: optuna.Study) -> list[dict]:
    """sweep.json's entry of every trial started by any worker, from the storage alone; waiting and surplus trials
    are left out. A trial claimed a moment ago may have no folder yet (dir None)."""
    trials = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if trial.state == TrialState.WAITING or attrs.get("surplus"):
            continue
        status = STATUS.get(trial.state, "failed")
        entry = {"number": trial.number, "params": attrs.get("params", trial.params), "sampled": trial.params,
                 "dir": attrs.get("dir"),
                 "status": status, "value": trial.value if status == "completed" else None,
                 "error": (attrs.get("error") or LOST) if status == "failed" else None,
                 "seconds": attrs.get("seconds"), "worker": attrs.get("worker")}
        if "failed_trial" in trial.system_attrs:  # a lost worker's trial, run again
            entry["retry_of"] = trial.system_attrs["failed_trial"]
        trials.append(entry)
    return trials


def write_record(sweep_dir: Path, build: Callable[[], dict]) -> dict:
    """Rebuild sweep.json from the storage and write it, one worker at a time: without the lock an older view could
    be renamed over a newer one written by another worker in between."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".sweep.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = build()
        write_atomic(sweep_dir / "sweep.json", json.dumps(record, indent=2) + "\n")
    return record
