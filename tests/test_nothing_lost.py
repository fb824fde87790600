"""Nothing a user made is lost: no command deletes, overwrites or mixes files it did not write, and a careless value
is refused with one line before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
        code, _, err = finished(llmtune_in(folder, ["export", str(tiny_run), "format=merged", f"out={out}",
                                                    "overwrite=true"], cache_dir))
        assert code == 2, err[-2000:]
        one_error_line(err)
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
    assert all(len(list((folder / "checkpoints").iterdir())) == 1 for folder in folders)
