"""`llmtune sweep --storage URL`: worker processes sharing one Optuna study run every grid point once and a random
search to exactly --count trials, in folders of their own; races at the boundaries, a lost worker, bad URLs; and one
real tiny-model sweep through SQLite."""

import collections
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from llmtune import sweep, sweep_storage
from llmtune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "sweeps" / "lora_grid.yaml"  # 8 points
RANDOM = REPO / "sweeps" / "lora_random.yaml"
SWEPT = ("method.lora.r", "method.lora.lora_alpha", "method.optimizer.lr")

# A worker process: the real `llmtune sweep` (sweep.main) with each trial faked in-process: it logs its arguments,
# runs for SLEEP_S, and writes what a run writes. Its first trial waits until WORKERS workers have started one, so the
# workers really run side by side. HANG=1 makes the first trial hang (the test kills that worker).
WORKER_SCRIPT = r'''
import json, os, sys, time
from pathlib import Path
import llmtune.__main__  # the CLI's own set-up (config resolvers, quiet libraries), as `llmtune sweep` has it
from llmtune import sweep, sweep_storage
from llmtune.errors import report_user_errors
from llmtune.tracking import FINAL_METRICS

sweep_storage.HEARTBEAT_S, sweep_storage.GRACE_S = 1, 2  # a lost worker is noticed in seconds, not minutes
SHARED = Path(os.environ["SHARED"])
started = []

def fake_launch(args):
    overrides = dict(arg.split("=", 1) for arg in args)
    run_dir = Path(overrides["hydra.run.dir"].strip("'"))
    run_dir.mkdir(parents=True)  # not exist_ok: two trials in one folder fail here
    (run_dir / "status.json").write_text(json.dumps({"status": "running"}))
    with open(SHARED / "launches.jsonl", "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "dir": run_dir.name, "args": args}) + "\n")
    if not started:
        started.append(1)
        (SHARED / f"started-{os.getpid()}").touch()
        if os.environ.get("HANG"):
            time.sleep(600)
        deadline = time.monotonic() + 60
        while len(list(SHARED.glob("started-*"))) < int(os.environ["WORKERS"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(float(os.environ["SLEEP_S"]))
    r, alpha, lr = (float(overrides[k]) for k in ("method.lora.r", "method.lora.lora_alpha", "method.optimizer.lr"))
    logged = {name: 0.0 for name in FINAL_METRICS} | {"val/accuracy": r / 100 + alpha / 1000 + lr}
    (run_dir / "metrics.json").write_text(json.dumps({"logged": logged}))
    (run_dir / "status.json").write_text(json.dumps({"status": "completed", "error": None}))
    return 0

sweep.launch_llmtune = fake_launch
report_user_errors(sweep.main)(sys.argv[1:])
'''


def start_worker(tmp_path: Path, argv: list[str], workers: int, sleep_s: float = 0.2, hang: bool = False):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    env = {**os.environ, "SHARED": str(tmp_path), "WORKERS": str(workers), "SLEEP_S": str(sleep_s),
           "COLUMNS": "200"} | ({"HANG": "1"} if hang else {})
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def run_workers(tmp_path: Path, argv: list[str], workers: int = 2) -> list[subprocess.CompletedProcess]:
    processes = [start_worker(tmp_path, argv, workers) for _ in range(workers)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def launches(tmp_path: Path) -> list[dict]:
    path = tmp_path / "launches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def point(args: list[str]) -> tuple:
    overrides = dict(arg.split("=", 1) for arg in args)
    return tuple(float(overrides[key]) for key in SWEPT)


def table_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("│") and line[1:].split("│")[0].strip().isdigit()]


def test_two_workers_run_every_grid_point_exactly_once(tmp_path):
    db, sweep_dir = tmp_path / "study.db", tmp_path / "sweep"
    results = run_workers(tmp_path, [str(GRID), "--storage", f"sqlite:///{db}", "--dir", str(sweep_dir),
                                     "logger=csv"])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]

    runs = launches(tmp_path)
    points = collections.Counter(point(run["args"]) for run in runs)
    assert len(runs) == 8 and len(points) == 8 and set(points.values()) == {1}  # all 8 points, none twice
    assert len({run["pid"] for run in runs}) == 2  # both workers took trials
    record = json.loads((sweep_dir / "sweep.json").read_text())
    trials = record["trials"]
    assert sorted(t["number"] for t in trials) == list(range(8)) and record["count"] == 8
    assert len({t["dir"] for t in trials}) == 8 and {t["dir"] for t in trials} == {run["dir"] for run in runs}
    assert all(t["status"] == "completed" and (sweep_dir / t["dir"] / "metrics.json").is_file() for t in trials)
    assert {t["worker"].split(":")[1] for t in trials} == {str(run["pid"]) for run in runs}
    assert {tuple(float(t["params"][k]) for k in SWEPT) for t in trials} == set(points)
    best = next(t for t in trials if t["number"] == record["best"])
    assert (best["params"]["method.lora.r"], best["params"]["method.lora.lora_alpha"]) == (16, 32)
    assert record["study"] == "lora-grid" and record["storage"] == f"sqlite:///{db}"
    for result in results:  # each worker prints the whole study, not only its own trials
        assert len(table_rows(result.stdout)) == 8, result.stdout
        assert f"llmtune report {sweep_dir}" in result.stdout


def test_two_workers_stop_a_random_search_at_exactly_count_trials(tmp_path):
    db = tmp_path / "study.db"
    results = run_workers(tmp_path, [str(RANDOM), "--count", "6", "--storage", f"sqlite:///{db}", "--study", "rnd",
                                     "--dir", str(tmp_path / "sweep"), "logger=csv"])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]

    runs = launches(tmp_path)
    assert len(runs) == 6 and len({run["pid"] for run in runs}) == 2
    # Each worker samples with its own seed: the same seed in both would propose the same points twice.
    assert len({point(run["args"]) for run in runs}) == 6
    trials = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["trials"]
    assert len(trials) == 6 and len({t["number"] for t in trials}) == 6 and len({t["dir"] for t in trials}) == 6
    assert all(t["status"] == "completed" for t in trials)
    study = optuna.load_study(study_name="rnd", storage=f"sqlite:///{db}")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 6 and sorted(t.number for t in complete) == sorted(t["number"] for t in trials)
    # Anything beyond the 6 is a surplus trial that was asked for in a race and never run.
    assert all(t.user_attrs.get("surplus") for t in study.get_trials() if t.state != TrialState.COMPLETE)


def test_a_lost_worker_s_grid_point_is_failed_and_run_again_by_the_next_worker(tmp_path):
    db, sweep_dir = tmp_path / "study.db", tmp_path / "sweep"
    argv = [str(GRID), "--count", "3", "--storage", f"sqlite:///{db}", "--dir", str(sweep_dir), "logger=csv"]
    lost = start_worker(tmp_path, argv, workers=1, hang=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("started-*")):
        assert lost.poll() is None and time.monotonic() < deadline, lost.communicate()[1][-3000:]
        time.sleep(0.1)
    lost.send_signal(signal.SIGKILL)  # the machine going away: no clean-up at all
    lost.communicate()
    time.sleep(4)  # past the worker script's grace period (2 s) since the lost worker's last heartbeat

    result = run_workers(tmp_path, argv, workers=1)[0]
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((sweep_dir / "sweep.json").read_text())
    by_number = {t["number"]: t for t in record["trials"]}
    assert by_number[0]["status"] == "failed" and by_number[0]["error"] == sweep_storage.LOST
    retry = next(t for t in record["trials"] if t.get("retry_of") == 0)
    assert retry["status"] == "completed" and retry["params"] == by_number[0]["params"] and retry["number"] >= 3
    completed = [tuple(t["params"].values()) for t in record["trials"] if t["status"] == "completed"]
    assert len(completed) == 3 and len(set(completed)) == 3  # the 3 points, each completed once
    assert len(launches(tmp_path)) == 4  # the lost one, then 3 by the second worker


SPACE = {"x": CategoricalDistribution([1, 2, 3])}


def shared_study(tmp_path: Path, retry: bool = False) -> tuple[optuna.Study, optuna.Study]:
    """Two workers' handles on one SQLite study, in this process, to interleave their steps by hand."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    first = optuna.create_study(storage=sweep_storage.open_storage(url, retry), study_name="race")
    return first, optuna.load_study(study_name="race", storage=sweep_storage.open_storage(url, retry))


def test_a_race_at_the_count_never_runs_more_than_count_trials(tmp_path):
    a, b = shared_study(tmp_path)
    assert sweep_storage.next_sampled_trial(a, SPACE, 2).number == 0
    ask = a.ask
    a.ask = lambda distributions: (b.ask(distributions), ask(distributions))[1]  # b asks between a's check and ask
    assert sweep_storage.next_sampled_trial(a, SPACE, 2) is None  # a's trial would be the third: not run
    trials = a.get_trials()
    assert [t.number for t in trials] == [0, 1, 2] and trials[2].state == TrialState.FAIL
    assert trials[2].user_attrs["surplus"] and not trials[1].user_attrs.get("surplus")
    assert [t["number"] for t in sweep_storage.stored_trials(a)] == [0, 1]


def test_a_grid_worker_that_loses_the_last_point_runs_no_sampled_point(tmp_path):
    a, b = shared_study(tmp_path)
    a.enqueue_trial({"x": 2})
    ask = a.ask
    a.ask = lambda distributions: (b.ask(distributions), ask(distributions))[1]  # b takes the point first
    assert sweep_storage.next_queued_trial(a, SPACE) is None
    trials = a.get_trials()
    assert trials[0].state == TrialState.RUNNING and trials[0].params == {"x": 2}  # b's
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["surplus"]  # created by a's ask, never run


def test_a_worker_killed_right_after_claiming_a_point_still_loses_it_to_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_storage, "HEARTBEAT_S", 1)
    monkeypatch.setattr(sweep_storage, "GRACE_S", 1)
    a, b = shared_study(tmp_path, retry=True)
    a.enqueue_trial({"x": 2})
    claimed = sweep_storage.next_queued_trial(a, SPACE)  # then killed: no heartbeat thread ever ran
    time.sleep(3)
    again = sweep_storage.next_queued_trial(b, SPACE)
    assert again is not None and again.params == {"x": 2} and again.number != claimed.number
    assert a.get_trials()[claimed.number].state == TrialState.FAIL


def test_ctrl_c_fails_the_trial_and_queues_the_grid_point_again(tmp_path):
    spec = sweep.load_spec(GRID)
    argv = [str(GRID), "--count", "3", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--dir", str(tmp_path / "s")]
    args = sweep.parse(sweep.SweepArgs, argv, "sweep")
    console = sweep.Console(quiet=True)
    calls = []

    def interrupted_on_the_second(trial_args):
        calls.append(point(trial_args))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fake_completed(trial_args)

    with pytest.raises(KeyboardInterrupt):
        sweep.run_worker(spec, 3, args, tmp_path / "unused", interrupted_on_the_second, console)
    record, _ = sweep.run_worker(spec, 3, args, tmp_path / "unused", fake_completed, console)
    by_number = {t["number"]: t for t in record["trials"]}
    assert by_number[1]["status"] == "failed" and "KeyboardInterrupt" in by_number[1]["error"]
    assert by_number[3]["retry_of"] == 1 and by_number[3]["params"] == by_number[1]["params"]
    assert [by_number[n]["status"] for n in (0, 2, 3)] == ["completed"] * 3 and len(by_number) == 4


def fake_completed(args: list[str]) -> int:
    run_dir = Path(dict(arg.split("=", 1) for arg in args)["hydra.run.dir"].strip("'"))
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"status": "completed"}))
    (run_dir / "metrics.json").write_text(json.dumps({"logged": {"val/accuracy": sum(point(args))}}))
    return 0


def test_a_joining_worker_must_run_the_same_sweep_in_the_same_folder(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = sweep.load_spec(GRID)
    console = sweep.Console(quiet=True)

    def worker(*extra):
        args = sweep.parse(sweep.SweepArgs, [str(GRID), "--count", "2", "--storage", url, *extra], "sweep")
        return sweep.run_worker(spec, args.count, args, tmp_path / "default", fake_completed, console)

    record, folder = worker("--dir", str(tmp_path / "first"), "logger=csv")
    assert folder == tmp_path / "first" and len(record["trials"]) == 2
    again, folder = worker("logger=csv")  # no --dir: the creator's folder; nothing left to run
    assert folder == tmp_path / "first" and again["trials"] == record["trials"]
    with pytest.raises(UserError, match=r"holds another sweep \(its overrides differ\).*--study NEW_NAME"):
        worker("logger=wandb")
    with pytest.raises(UserError, match="keeps its trials in .*first: leave out --dir"):
        worker("--dir", str(tmp_path / "other"), "logger=csv")


@pytest.mark.parametrize("url,expected", [
    ("postgresql://nobody@127.0.0.1:1/x", "cannot reach the database (connection to server at \"127.0.0.1\", port 1"),
    ("sqlite:////nonexistent/dir/x.db", "cannot reach the database (unable to open database file)"),
    ("mongodb://host/db", "unknown database 'mongodb'"),
    ("mysql://user@127.0.0.1/x", "its database driver (MySQLdb) is not installed"),
    ("study.db", "is not a database URL"),
    ("sqlite://", "in-memory database"),
])
def test_a_bad_storage_url_is_one_line_and_exit_2_before_any_trial(tmp_path, url, expected):
    result = subprocess.run([sys.executable, "-m", "llmtune", "sweep", str(GRID), "--storage", url,
                             "--dir", str(tmp_path / "sweep"), "logger=csv"],
                            capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
                            env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"llmtune: error: --storage {url}") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "sweep").exists()


def test_storage_options_that_do_not_combine_are_one_line(tmp_path):
    with pytest.raises(UserError, match="add --storage URL"):
        sweep.main([str(GRID), "--study", "x"])
    with pytest.raises(UserError, match="drop --resume"):
        sweep.main([str(GRID), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--resume", "true"])
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "sweep.json").write_text(json.dumps({"storage": "sqlite:///s.db", "study": "lora-grid"}))
    with pytest.raises(UserError, match="trials are in study lora-grid of sqlite:///s.db: run a worker with --storage"):
        sweep.main([str(GRID), "--dir", str(tmp_path / "earlier"), "--resume", "true"])
    with pytest.raises(UserError, match="already holds a sweep .* that is not study lora-grid: choose another --dir"):
        sweep.main([str(GRID), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--dir", str(tmp_path / "earlier")])


def test_real_tiny_sweep_through_sqlite(tmp_path, cache_dir):
    sweep.main([str(GRID), "--count", "2", "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--dir",
                str(tmp_path / "sweep"), "model=tiny", "trainer.max_epochs=1", "logger=csv",
                "dataset.split.train_per_class=10", "dataset.split.val_per_class=5", "dataset.split.test_per_class=5"])
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["completed", "completed"], record["trials"]
    study = optuna.load_study(study_name="lora-grid", storage=f"sqlite:///{tmp_path / 'study.db'}")
    for trial, stored in zip(record["trials"], study.get_trials()):
        logged = json.loads((tmp_path / "sweep" / trial["dir"] / "metrics.json").read_text())["logged"]
        assert trial["value"] == logged["val/accuracy"] == stored.value and math.isfinite(trial["value"])
        assert stored.user_attrs["dir"] == trial["dir"] and stored.state == TrialState.COMPLETE
