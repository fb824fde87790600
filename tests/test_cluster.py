"""Past one process on one machine: a grid through Hydra's submitit launcher, ranks that SLURM starts itself, and
ranks left behind when rank 0 is killed. (A file of its own: pytest-xdist runs a file on one worker.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_distributed import split_digests


def test_a_grid_through_the_submitit_launcher_runs_each_job_in_its_own_process(tmp_path, cache_dir, tiny_model_dir):
    """hydra/launcher=local: Hydra's submitit launcher, the code path of hydra/launcher=slurm on this machine. Each job
    lands in the sweep folder the launcher made, and a failed job is listed in the launching process (exit 1)."""
    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "llmtune", "-m", "hydra/launcher=local", "trainer.max_epochs=1",
         "dataset.split.train_per_class=8,5000", "dataset.split.test_per_class=4", "eval.baseline=false",
         f"model.path={tiny_model_dir}", "model=tiny"], cwd=tmp_path, capture_output=True, text=True, env=env,
        timeout=600, check=False)
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps  # the jobs' processes put their folders in the launcher's sweep folder
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name[0] for p in jobs] == ["0", "1"]
    pids = {json.loads((job / "status.json").read_text())["pid"] for job in jobs}
    assert len(pids | {os.getpid()}) == 3  # two processes of their own, neither this one
    statuses = [json.loads((job / "status.json").read_text())["status"] for job in jobs]
    assert statuses == ["completed", "failed"]
    assert json.loads((jobs[0] / "metrics.json").read_text())["run"]["n_train"] == 24
    assert result.returncode == 1 and "1 job(s) failed" in result.stderr and "train_per_class asks for 5000" in \
        result.stderr, result.stderr[-2000:]
    assert len(list((sweeps[0] / ".submitit").glob("*/*_log.out"))) == 2  # submitit's own record of each job


def test_ranks_started_by_slurm_are_one_run_through_lightnings_slurm_environment(tmp_path, cache_dir, tiny_model_dir):
    """What `srun` (or the submitit launcher with tasks_per_node=2) does: start every rank itself, with SLURM's
    variables; Lightning reads the ranks from them and starts nothing, and rank 0 alone writes the shared folder."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = []
    for rank in range(2):
        env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "SLURM_NTASKS": "2",
               "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NAME": "llmtune", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen(
            [sys.executable, "-m", "llmtune", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1",
             "dataset.split.train_per_class=8", "dataset.split.test_per_class=4", "eval.baseline=false",
             "hydra.run.dir=run", f"model.path={tiny_model_dir}", "model=tiny"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=600)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    run = tmp_path / "run"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["train"]["processes"] == 2 and "SLURM" in outputs[1]  # Lightning's SLURM environment
    assert {p.name for p in run.glob("*.log")} == {"__main__.log", "rank_1.log"}  # a log each, one .hydra/
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert len(set(split_digests(run).values())) == 1


def test_the_other_ranks_end_when_rank_0_is_killed(tmp_path, cache_dir, tiny_model_dir):
    """kill -9 of rank 0 (the command the user started) leaves no rank behind waiting for it."""
    import signal
    import time

    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    parent = subprocess.Popen(
        [sys.executable, "-m", "llmtune", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=500",
         "dataset.split.train_per_class=30", "eval.baseline=false", "hydra.run.dir=run", f"model.path={tiny_model_dir}",
         "model=tiny"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children_file = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    deadline = time.monotonic() + 300
    children = []
    while not children and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.5)
        children = [int(pid) for pid in children_file.read_text().split()]
    assert children, "rank 0 never started rank 1"
    time.sleep(3)  # rank 1 is up, importing or waiting for its peer
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and
                                              "zombie" not in Path(f"/proc/{pid}/status").read_text()
                                              for pid in children):
        time.sleep(0.5)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive
