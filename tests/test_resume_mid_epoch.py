"""A run killed after a step checkpoint taken in the middle of an epoch (callbacks.checkpoint.every_n_train_steps)
resumes to the adapter an uninterrupted run ends with: the resumed epoch goes on with the batches the killed process
had not trained on yet, in the same order, and the epochs after it are drawn as before."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from conftest import run_llmtune

STEPS_PER_EPOCH = 15  # 3 labels x 40 training rows, 8 per batch
ARGS = ["model=tiny", "trainer.max_epochs=2", "dataset.split.train_per_class=40", "dataset.split.val_per_class=0",
        "dataset.split.test_per_class=2", "eval.baseline=false", "callbacks.checkpoint.every_n_train_steps=4"]


def test_a_run_killed_mid_epoch_resumes_to_the_same_adapter(tmp_path, cache_dir):
    from safetensors.torch import load_file

    from llmtune.run_state import last_checkpoint

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = run_llmtune([*ARGS, f"hydra.run.dir={whole}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = json.loads((whole / "metrics.json").read_text())["train"]["steps"]
    assert steps == 2 * STEPS_PER_EPOCH

    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    process = subprocess.Popen([sys.executable, "-m", "llmtune", *ARGS, f"hydra.run.dir={killed}"], cwd=tmp_path,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_step_checkpoint = killed / "checkpoints" / "step=4.ckpt"
    deadline = time.monotonic() + 300
    while not first_step_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # no handler runs, as with the OOM killer
    process.wait()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    checkpoint = last_checkpoint(killed)  # what the rerun continues from: last.ckpt, or the newest step=N.ckpt
    saved_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    assert saved_at % STEPS_PER_EPOCH != 0, f"the checkpoint (step {saved_at}) is at an epoch's end, not inside one"

    result = run_llmtune([f"resume={killed}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    train = json.loads((killed / "metrics.json").read_text())["train"]
    assert train["resumed_from_step"] == saved_at and train["steps"] == steps
    resumed = load_file(killed / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert "resuming from a checkpoint that ended before the epoch ended" not in result.stderr  # Lightning's warning


def test_a_restored_sampler_hands_out_the_rest_of_its_epoch_then_whole_epochs():
    from llmtune.data.batching import LengthPoolBatchSampler, PackedBatchSampler

    for make in (lambda: LengthPoolBatchSampler(list(range(3, 40)), 4, 2, seed=7),
                 lambda: PackedBatchSampler(list(range(3, 40)), 2, 64, seed=7)):
        uninterrupted = make()
        epochs = []
        for epoch in range(3):
            uninterrupted.set_epoch(epoch)
            epochs.append(list(uninterrupted))
        killed = make()
        killed.set_epoch(1)
        drawn = iter(killed)
        done = [next(drawn) for _ in range(3)]  # three batches of epoch 1 trained, then a checkpoint
        state = killed.state_dict()
        assert state == {"epoch": 1, "batches": 3} and done == epochs[1][:3]
        resumed = make()
        resumed.load_state_dict(state)
        resumed.set_epoch(1)
        assert list(resumed) == epochs[1][3:]  # the rest of the epoch, in its order
        resumed.set_epoch(2)
        assert list(resumed) == epochs[2]  # the next epoch whole
        assert resumed.state_dict() == {"epoch": 2, "batches": len(epochs[2])}


def test_a_run_folder_moved_elsewhere_still_resumes_but_not_with_other_settings(tmp_path):
    """resume=RUN_DIR on a run folder copied from another machine or renamed: the paths inside it (the checkpoint
    folder, the logger's) follow the folder, so they are no "other settings"; a real change still is."""
    import pytest
    import yaml

    from llmtune.errors import UserError
    from llmtune.run_state import check_same_run

    def config(run_dir: str, seed: int = 1) -> dict:
        return {"seed": seed, "paths": {"output_dir": run_dir},
                "callbacks": {"checkpoint": {"dirpath": f"{run_dir}/checkpoints"}}, "logger": {"save_dir": run_dir}}

    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    (moved / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    (moved / "config.yaml").write_text(yaml.safe_dump(config("/cluster/outputs/run")))
    check_same_run(moved, config(str(moved)))
    with pytest.raises(UserError, match=r"holds a run with other settings \(seed: 1 -> 2\)"):
        check_same_run(moved, config(str(moved), seed=2))


def test_a_run_started_by_another_llmtune_version_resumes_with_its_settings_at_their_defaults(tmp_path, caplog):
    """An upgrade adds settings (at defaults that keep the old behaviour) or drops some: the run folder an older
    version left still resumes, with a warning naming them. A setting the command line names still binds."""
    import pytest
    import yaml

    from llmtune.errors import UserError
    from llmtune.run_state import check_same_run

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    older = {"seed": 1, "method": {"lr": 2e-4, "retired_option": True},
             "callbacks": {"checkpoint": {"save_last": True}},
             "logger": {"_target_": "lightning.pytorch.loggers.CSVLogger"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    # How checkpoints are saved and where the run logs may change too: neither changes what the run computes.
    upgraded = {"seed": 1, "method": {"lr": 2e-4, "label_smoothing": 0.0},
                "callbacks": {"checkpoint": {"save_last": "link"}},
                "logger": {"_target_": "llmtune.training.csv_logger.ContinuedCSVLogger"}}
    with caplog.at_level("WARNING"):
        check_same_run(tmp_path, upgraded, ["seed=1"])
    assert "another llmtune version" in caplog.text
    assert "lacked at their defaults (method.label_smoothing)" in caplog.text
    assert "no longer has (method.retired_option)" in caplog.text
    with pytest.raises(UserError, match=r"other settings \(method.label_smoothing: None -> 0.1\)"):
        check_same_run(tmp_path, {**upgraded, "method": {"lr": 2e-4, "label_smoothing": 0.1}},
                       ["method.label_smoothing=0.1"])
    with pytest.raises(UserError, match=r"other settings \(method.lr: 0.0002 -> 0.001\)"):
        check_same_run(tmp_path, {**upgraded, "method": {"lr": 1e-3, "label_smoothing": 0.0}}, ["method.lr=1e-3"])


def test_a_run_continued_in_its_folder_keeps_the_earlier_attempts_log_rows(tmp_path, cache_dir):
    """Lightning's CSVLogger deletes logs/metrics.csv when its folder is not empty; a continued run appends to it."""
    import csv

    from conftest import run_llmtune

    args = ["model=tiny", "dataset.split.train_per_class=10", "dataset.split.test_per_class=5",
            "trainer.log_every_n_steps=1", f"hydra.run.dir={tmp_path / 'run'}"]
    for epochs in (1, 2):  # the second: resume with a longer budget
        result = run_llmtune([*args, f"trainer.max_epochs={epochs}"], cache_dir)
        assert result.returncode == 0, result.stderr[-2000:]
        with open(tmp_path / "run" / "logs" / "metrics.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        losses = {int(row["epoch"]) for row in rows if row.get("train/loss")}
        assert losses == set(range(epochs))  # every epoch's training rows, the first attempt's included
        assert sum(1 for row in rows if row.get("val/accuracy") and row.get("val/loss")) == epochs
