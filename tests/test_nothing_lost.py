"""Nothing a user made is lost: no command deletes, overwrites or mixes files it did not write, and a careless value
is refused with one line before any work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_llmtune

from llmtune.errors import UserError
from llmtune.evaluation.batches import length_sorted_batches
from llmtune.files import OUTPUT_MARKER, atomic_folder, write_atomic, write_atomic_with


def llmtune_in(folder: Path, args: list[str], cache_dir: Path, **popen) -> subprocess.Popen:
    """`python -m llmtune ARGS` started from `folder` (relative paths, outputs/ and `..` mean what a user means)."""
    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "llmtune", *args], cwd=folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finished(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("llmtune: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_replaces_a_folder_it_did_not_write(tiny_run, cache_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    nested = tmp_path / "work" / "sub"
    nested.mkdir(parents=True)
    (tmp_path / "work" / "keep.txt").write_text("keep me")
    before = tree(tmp_path)

    for folder, out in [(tmp_path, "mine"), (nested, ".."), (nested, "."), (tmp_path, "mine/notes.txt")]:
        result = run_llmtune(["export", str(tiny_run), "format=merged", f"out={out}", "overwrite=true"], cache_dir,
                             cwd=folder)
        assert result.returncode == 2, result.stderr[-2000:]
        one_error_line(result.stderr)
    assert tree(tmp_path) == before

    # A new folder is written whole, marked as llmtune's; a second export there needs overwrite=true.
    out = tmp_path / "export"
    result = run_llmtune(["export", str(tiny_run), "format=merged", f"out={out}", "check=false"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / OUTPUT_MARKER).is_file() and (out / "config.json").is_file()
    result = run_llmtune(["export", str(tiny_run), "format=merged", f"out={out}", "check=false"], cache_dir)
    assert result.returncode == 2 and "overwrite=true" in one_error_line(result.stderr)
    result = run_llmtune(["export", str(tiny_run), "format=merged", f"out={out}", "check=false", "dtype=float32",
                          "overwrite=true"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "llmtune_export.json").read_text())["dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old folder left behind


def test_a_failed_folder_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_folder(target, overwrite=True) as staging:
        (staging / "a.txt").write_text("second, half done")
        raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_file_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_atomic(path, "old")

    def crash(partial):
        partial.write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        write_atomic_with(path, crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(UserError, match="is a folder"):
        write_atomic(tmp_path, "x")


def test_batches_below_one_are_refused_not_read_from_empty_memory():
    assert list(length_sorted_batches([3, 1, 2], 2, "x")) == [[1, 2], [0]]
    for size in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            list(length_sorted_batches([3, 1, 2], size, "x"))


def test_predict_never_overwrites_its_input_or_an_earlier_output(tiny_run, cache_dir, tmp_path):
    inputs = []
    for folder in ("a", "b"):  # two inputs of one name in different folders
        (tmp_path / folder).mkdir()
        inputs.append(tmp_path / folder / "data.csv")
        inputs[-1].write_text("text\nProfit rose sharply\nThe outlook was cut\n")
    before = tree(tmp_path)
    run = tiny_run.parent / "predict-run"  # a copy: predict writes into the run folder by default
    subprocess.run(["cp", "-r", str(tiny_run), str(run)], check=True)

    refused = [(["out={input}"], "is the input file"), (["out={folder}"], "is a folder"),
               (["batch_size=-1"], "batch_size=-1 must be at least 1")]
    for args, expected in refused:
        args = [a.format(input=inputs[0], folder=tmp_path / "a") for a in args]
        result = run_llmtune(["predict", str(run), f"input={inputs[0]}", *args], cache_dir)
        assert result.returncode == 2 and expected in one_error_line(result.stderr)
    assert tree(tmp_path) == before

    for source in inputs:
        result = run_llmtune(["predict", str(run), f"input={source}"], cache_dir)
        assert result.returncode == 0, result.stderr[-2000:]
    outputs = sorted((run / "predict").iterdir())
    assert len(outputs) == 2 and all(p.name.startswith("data-") for p in outputs)
    result = run_llmtune(["predict", str(run), f"input={inputs[0]}"], cache_dir)
    assert result.returncode == 2 and "overwrite=true" in one_error_line(result.stderr)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("value", ["no", "maybe", "1"])
def test_a_switch_takes_only_true_or_false(tmp_path, cache_dir, value):
    result = run_llmtune(["model=tiny", f"rag={value}", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir)
    assert result.returncode == 2
    assert f"rag={value!r}" in one_error_line(result.stderr).replace('"', "'") or value == "1"
    assert "must be true or false" in one_error_line(result.stderr)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_two_runs_started_together_get_their_own_folders(tmp_path, cache_dir):
    small = ["model=tiny", "trainer.max_epochs=1", "dataset.split.train_per_class=4", "dataset.split.val_per_class=0",
             "dataset.split.test_per_class=4", "eval.baseline=false"]
    runs = [llmtune_in(tmp_path, [*small, f"seed={seed}"], cache_dir) for seed in (1, 2)]
    for process in runs:
        code, _, err = finished(process)
        assert code == 0, err[-2000:]
    folders = sorted(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    assert len(folders) == 2
    seeds = sorted(json.loads((folder / "metrics.json").read_text())["run"]["seed"] for folder in folders)
    assert seeds == [1, 2]
    for folder in folders:  # each run's own checkpoints, none of the other's
        steps = [json.loads((folder / "metrics.json").read_text())["train"]["steps"]]
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        assert sorted(p.name for p in (folder / "checkpoints").glob("step=*.ckpt")) == [f"step={steps[0]}.ckpt"]


@pytest.mark.parametrize("override,expected", [
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc' must be a valid integer"),
    ("trainer.batch_size=abc", "trainer.batch_size='abc' must be a valid integer"),
    ("seed=abc", "seed='abc' must be a valid integer"),
    ("method.lora.r=0", "method.lora.r=0 must be greater than or equal to 1"),
    ("method.optimizer.lr=-1", "method.optimizer.lr=-1 must be greater than 0"),
    ("method.lora.lora_dropout=2", "method.lora.lora_dropout=2 must be less than 1"),
    ("trainer.accelerator=gpuu", "trainer.accelerator='gpuu' must be 'auto', 'cpu'"),
    ("+trainer.ckpt_path=x", "trainer.ckpt_path is not a setting"),
])
def test_a_bad_value_is_one_line_before_any_model_loads(tmp_path, cache_dir, override, expected):
    result = run_llmtune(["model=tiny", override, f"hydra.run.dir={tmp_path / 'run'}"], cache_dir)
    assert result.returncode == 2 and expected in one_error_line(result.stderr)
    assert "scoring" not in result.stderr and not (tmp_path / "run" / "metrics.json").exists()


def test_a_killed_run_resumes_to_the_same_adapter(tmp_path, cache_dir):
    from safetensors.torch import load_file

    from llmtune.run_state import read_status

    args = ["model=tiny", "trainer.max_epochs=4", "dataset.split.train_per_class=100", "dataset.split.val_per_class=0",
            "dataset.split.test_per_class=5", "eval.baseline=false"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = run_llmtune([*args, f"hydra.run.dir={whole}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]

    process = llmtune_in(tmp_path, [*args, f"hydra.run.dir={killed}"], cache_dir)
    checkpoint = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # as a lost node or the OOM killer would: no handler runs
    process.communicate()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    assert read_status(killed)["status"] == "killed"

    result = run_llmtune([*args, f"hydra.run.dir={killed}"], cache_dir)  # the same command again
    assert result.returncode == 0, result.stderr[-2000:]
    train = json.loads((killed / "metrics.json").read_text())["train"]
    assert train["resumed_from_step"] > 0 and train["steps"] == json.loads((whole / "metrics.json").read_text())[
        "train"]["steps"]
    resumed_weights = load_file(killed / "adapter" / "adapter_model.safetensors")
    whole_weights = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert resumed_weights.keys() == whole_weights.keys()
    for name, tensor in whole_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    assert "Resumed from the checkpoint at step" in (killed / "report.md").read_text()


def test_repeated_texts_are_dropped_before_splitting_and_counted(tmp_path):
    from omegaconf import open_dict

    from conftest import compose_config
    from llmtune.tasks.classification import Classification

    lines = ["text,label"]
    for label in ("positive", "negative", "neutral"):
        for i in range(20):
            lines += [f"{label} news number {i},{label}", f"{label.upper()}  news number {i},{label}"]  # twice each
    lines += ["positive news number 0,negative", ",neutral"]  # a conflicting copy and a row without text
    path = tmp_path / "repeated.csv"
    path.write_text("\n".join(lines) + "\n")
    cfg = compose_config(["dataset.split.train_per_class=12", "dataset.split.val_per_class=2",
                          "dataset.split.test_per_class=6"])
    with open_dict(cfg):
        cfg.dataset.path, cfg.dataset.id_column = str(path), None
    task = Classification(cfg.dataset)
    splits = task.load_splits(seed=1)
    seen = [" ".join(r["text"].lower().split()) for rows in splits.values() for r in rows]
    assert len(seen) == len(set(seen)) == 60  # every text once, in one split
    counts = {key: task.data_counts[key] for key in ("rows_read", "empty_text", "duplicates_removed",
                                                     "conflicting_answers", "overlap_with_test")}
    assert counts == {"rows_read": 122, "empty_text": 1, "duplicates_removed": 61, "conflicting_answers": 1,
                      "overlap_with_test": {}}
    with open_dict(cfg):
        cfg.dataset.duplicates = "keep"
    kept = Classification(cfg.dataset)
    kept_texts = [" ".join(r["text"].lower().split()) for rows in kept.load_splits(seed=1).values() for r in rows]
    assert len(kept_texts) > len(set(kept_texts))  # duplicates=keep: every row as read, repeats included
    assert "duplicates_removed" not in kept.data_counts


def test_a_run_folder_from_someone_else_cannot_run_code_on_load(tiny_run, cache_dir, tmp_path):
    import yaml

    source = tmp_path / "sentences.csv"
    source.write_text("text\nProfit rose sharply\n")
    cases = {"remote code": lambda c: c["model"].update(trust_remote_code=True),
             "own model folder": lambda c: c["model"].update(path=str(tmp_path / "elsewhere")),
             "foreign class": lambda c: c["method"].update(_target_="os.system")}
    for case, edit in cases.items():
        run = tmp_path / case.replace(" ", "-")
        subprocess.run(["cp", "-r", str(tiny_run), str(run)], check=True)
        config = yaml.safe_load((run / "config.yaml").read_text())
        edit(config)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        result = run_llmtune(["predict", str(run), f"input={source}", "out=-"], cache_dir)
        assert result.returncode == 2 and "trust_remote_code=true" in one_error_line(result.stderr), case
    # Said on the command line, the flag lets a trusted folder load (the tiny model needs no remote code).
    result = run_llmtune(["predict", str(tmp_path / "remote-code"), f"input={source}", "out=-",
                          "trust_remote_code=true"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_full_disk_keeps_the_old_checkpoint_whole_and_still_marks_the_run_failed(tmp_path, monkeypatch):
    import errno

    import llmtune.files
    from llmtune import run_state
    from llmtune.training.checkpoints import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 4, "state_dict": {"w": torch.ones(3)}}, path)
    run_state.write_status(tmp_path, "running", "t0")

    def no_space(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(llmtune.files.os, "replace", no_space)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"global_step": 8, "state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 4  # the previous one, whole
    run_state.write_status(tmp_path, "failed", "t0", "no space left")
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "status.json"]  # no partial files


def test_atomic_outputs_get_the_usual_permissions_not_the_temp_files_private_ones(tmp_path):
    """mkstemp/mkdtemp create 0600/0700: an export or metrics file others could not read (umask 022 here)."""
    import os

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "metrics.json", "{}\n")
        with atomic_folder(tmp_path / "export") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
