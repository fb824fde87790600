"""Several processes, one run: Lightning's strategies (trainer=ddp|fsdp|deepspeed_zero2|deepspeed_zero3) train, and
this module keeps the run one run.

- Rank 0 owns the run folder: it scores, writes every output and logs; the other ranks train their shard and stop.
- On one machine Lightning starts the other ranks by running the command line again (its subprocess launcher). A
  Hydra multirun or a resumed run would then start a whole grid, or another folder, in each of them: before fit the
  parent puts its own job's overrides and run folder in the environment (LLMTUNE_DISTRIBUTED_JOB), and `relaunched_argv`
  makes each child that one job, in that folder.
- On a cluster (SLURM: srun, or Hydra's submitit launcher with tasks_per_node = devices) every rank is started by the
  scheduler and Lightning reads its rank from the environment; the launcher gives all of them the same run folder.
"""

import json
import logging
import os
from contextlib import contextmanager

log = logging.getLogger(__name__)

JOB_VARIABLE = "LLMTUNE_DISTRIBUTED_JOB"


def global_rank() -> int:
    """This process's rank in the run, from the environment its launcher set: Lightning's own rule (RANK, then
    LOCAL_RANK, then SLURM_PROCID), read without importing Lightning (the Hydra config asks, before a job starts);
    0 for a run of one process."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def is_rank_zero() -> bool:
    return global_rank() == 0


def rank_zero_only(value, other=None):
    """A Hydra config value for rank 0, `other` for the other ranks (conf/hydra/default.yaml: Hydra's .hydra/ copy of
    the config is written once, and each rank logs to a file of its own in the shared run folder)."""
    return value if global_rank() == 0 else other


def shard() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) outside one. Read when batches are drawn: the group
    exists once Lightning's strategy has set up, after the loaders were made."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_job_with_children(overrides: list[str], run_dir: str) -> None:
    """What a rank Lightning starts on this machine must run: this job's overrides, into this run folder."""
    os.environ[JOB_VARIABLE] = json.dumps({"overrides": list(overrides), "run_dir": str(run_dir),
                                           "parent": os.getpid()})


def relaunched_argv(argv: list[str]) -> list[str]:
    """A child rank's command line: the parent job's own overrides into its run folder, without writing a second
    .hydra/ there, whatever the command line Lightning copied (-m and a grid, resume=...) says."""
    job = os.environ.get(JOB_VARIABLE)
    if not job or "LOCAL_RANK" not in os.environ or os.environ["LOCAL_RANK"] == "0":
        return argv
    job = json.loads(job)
    rank = os.environ["LOCAL_RANK"]
    end_with_parent(job["parent"])
    return [*job["overrides"], f"hydra.run.dir={json.dumps(job['run_dir'])}", f"hydra.job.name=rank_{rank}",
            "hydra.output_subdir=null"]


def end_with_parent(parent_pid: int, every_s: float = 2.0) -> None:
    """A rank Lightning started ends when rank 0's process is gone (killed with -9, its machine's OOM killer): it would
    otherwise wait up to torch's 30-minute rendezvous timeout for a peer that never comes, holding its memory."""
    import threading
    import time

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        log.error("rank 0 (process %d) is gone; this rank stops too", parent_pid)
        os._exit(1)

    threading.Thread(target=watch, name="llmtune-parent-watch", daemon=True).start()


def describe_split(splits: dict) -> None:
    """One log line per rank: the split every rank drew (a digest of its rows, equal on every rank) and the size of
    this rank's share; the batch logs of the ranks then show they trained on one split."""
    import hashlib

    digest = hashlib.sha256(json.dumps(splits, sort_keys=True, default=str).encode()).hexdigest()[:12]
    log.info("rank %d: data split %s (%s)", global_rank(), digest,
             ", ".join(f"{name} {len(rows)}" for name, rows in splits.items()))


# What Lightning's subprocess launcher sets in the parent's own environment before it starts the other ranks.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS",
                    JOB_VARIABLE)


@contextmanager
def one_job(overrides: list[str], run_dir: str):
    """A job of this process (rank 0), distributed or not. Its ranks get the job's overrides and folder; after it, the
    process group is closed and the launcher's variables put back, so the next job of a multirun starts its own ranks
    (with LOCAL_RANK left set, Lightning would take the next job for an externally started rank and wait for peers
    that never come)."""
    import torch.distributed as dist

    before = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    share_job_with_children(overrides, run_dir)
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_peak_memory() -> None:
    """This process's peak resident memory, one line in its log (each rank of a distributed run has its own)."""
    import resource

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    log.info("rank %d: peak RSS %.2f GiB", global_rank(), peak_gib)
