"""benchmarks/gpu.py: the CPU smoke run end to end (with or without TRL installed), the refusal to run the full shapes
without CUDA, and the GPU-only reporting (peak table, targets) on made-up results."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
# Hide any GPU, so these tests check the CPU behaviour on every machine (a visible GPU would start the full run).
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


def run_gpu_py(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=NO_CUDA,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-bench-out")
    models = tmp_path_factory.mktemp("gpu-bench-models")
    return run_gpu_py(["--smoke", "--out", str(out), "--model-cache", str(models)], timeout=600), out


def test_smoke_run_measures_the_llmtune_arms_and_writes_results(smoke):
    result, out = smoke
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"gpu_smoke.json", "gpu_smoke.md"}
    data = json.loads((out / "gpu_smoke.json").read_text())
    assert data["peak_tflops"] > 0 and "4N" in data["mfu_formula"]
    arms = data["arms"]
    ran = ["llama3_8b/llmtune_lora"] + (["llama3_8b/llmtune_qlora"] if importlib.util.find_spec("bitsandbytes")
                                         else [])
    for key in ran:
        arm = arms[key]
        assert arm["tokens_per_s"] > 0 and arm["timed_steps"] >= 1
        assert math.isfinite(arm["mfu"]) and arm["mfu"] > 0
        assert arm["peak_rss_gib"] > 0  # on a CPU the peak memory figure is the arm process's peak RSS
        assert all(math.isfinite(loss) for loss in arm["losses"])
    assert "| llama3_8b | llmtune_lora |" in result.stdout
    assert (out / "gpu_smoke.md").read_text().strip() in result.stdout


def test_smoke_run_runs_or_explains_every_trl_arm(smoke):
    result, out = smoke
    arms = json.loads((out / "gpu_smoke.json").read_text())["arms"]
    trl = [key for key in arms if key.split("/")[1].startswith("trl_")]
    assert len(trl) == 5
    if importlib.util.find_spec("trl") is None:
        assert all("trl is not installed" in arms[key]["skipped"] for key in trl)
    else:
        for key in ("llama3_8b/trl_default", "llama3_8b/trl_packing", "llama3_8b/trl_padding_free",
                    "llama3_8b/trl_tuned"):
            assert arms[key]["tokens_per_s"] > 0, arms[key]
        assert "skipped" in arms["llama3_8b/trl_liger"]  # Liger's kernels need a GPU
    # Every skipped arm says why, in the table as in the JSON.
    for key, arm in arms.items():
        if "skipped" in arm:
            assert f"skipped: {arm['skipped']}" in result.stdout


def test_full_shapes_without_cuda_stop_with_one_line_and_exit_2(tmp_path):
    result = run_gpu_py(["--out", str(tmp_path)], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "--smoke" in lines[0]
    assert result.stdout == "" and not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_table_matches_device_names(gpu_module):
    assert gpu_module.data_sheet_peak("NVIDIA H200") == 989.0
    assert gpu_module.data_sheet_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_module.data_sheet_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu_module.data_sheet_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_module.data_sheet_peak("Some Other GPU") is None


def test_targets_are_judged_on_a_gpu_run(gpu_module):
    """The pass/fail columns only a GPU run prints, on made-up figures."""
    results = {"llama3_8b/llmtune_lora": {"tokens_per_s": 1600.0, "mfu": 0.42},
               "llama3_8b/trl_default": {"tokens_per_s": 1000.0},
               "llama3_8b/llmtune_qlora": {"tokens_per_s": 700.0, "peak_gpu_allocated_gib": 12.5},
               "gemma2b/llmtune_lora": {"tokens_per_s": 3000.0},
               "gemma2b/trl_default": {"tokens_per_s": 2500.0}}
    verdicts = {row["target"]: row["verdict"] for row in gpu_module.targets(results, judged=True)}
    assert verdicts == {"gemma2b: llmtune LoRA ≥ 1.5x TRL defaults tokens/s": "fail",
                        "llama3_8b: llmtune LoRA ≥ 1.5x TRL defaults tokens/s": "pass",
                        "llama3_8b: llmtune LoRA MFU ≥ 40%": "pass",
                        "llama3_8b: llmtune QLoRA peak GPU memory ≤ 12 GiB at batch 8 x 512": "fail"}
    assert {row["verdict"] for row in gpu_module.targets(results, judged=False)} == {"not judged (smoke run)"}
