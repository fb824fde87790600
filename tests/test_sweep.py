"""Sweep specs and `llmtune sweep`: the shipped specs name real config keys, W&B's spec maps onto Optuna, the runner
records every trial (failed ones too) and picks the best, and one real tiny-model sweep end to end."""

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from llmtune import sweep
from llmtune.errors import UserError
from llmtune.tracking import FINAL_METRICS

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "sweeps").glob("*.yaml"))
GRID = REPO / "sweeps" / "lora_grid.yaml"


def test_the_three_lora_specs_are_shipped():
    assert {p.name for p in SPECS} >= {"lora_grid.yaml", "lora_bayes.yaml", "lora_random.yaml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_names_real_config_keys_with_values_of_their_type(path):
    spec = sweep.load_spec(path)
    assert spec.metric in FINAL_METRICS and spec.metric.startswith("val/") and spec.goal == "maximize"
    assert "${args_no_hyphens}" in spec.raw["command"] and spec.fixed_args == ["logger=wandb"]
    assert spec.raw.get("name") and spec.raw.get("description")

    cfg = compose_config(spec.fixed_args)
    for parameter in spec.parameters:
        default = OmegaConf.select(cfg, parameter.name, default=KeyError)
        assert default is not KeyError, f"{parameter.name} is not a key of the composed config"
        distribution = parameter.distribution
        if distribution is None:  # a fixed value
            candidates = [parameter.value]
        elif isinstance(distribution, CategoricalDistribution):
            candidates = list(distribution.choices)
        else:
            candidates = [distribution.low, distribution.high]
        for value in candidates:  # a bool is an int in Python, and YAML's 1e-4 is a str: both would be wrong
            if isinstance(default, str):
                assert type(value) is str, (parameter.name, value)
            elif isinstance(default, int):
                assert type(value) is int and value > 0, (parameter.name, value)
            elif isinstance(default, float):
                assert type(value) in (int, float) and value >= 0, (parameter.name, value)
                if parameter.name == "method.optimizer.lr":
                    assert 0 < value < 1, value
    sweep.check_keys(spec, [])  # Hydra's own key and group-option check passes too


def test_grid_runs_each_of_the_8_combinations_once():
    spec = sweep.load_spec(GRID)
    points = spec.grid()
    expected = set(itertools.product([8, 16], [16, 32], [1.0e-4, 3.0e-4]))
    assert len(points) == 8 and {tuple(p.values()) for p in points} == expected
    assert sweep._count(spec, None) == 8 and sweep._count(spec, 100) == 8 and sweep._count(spec, 3) == 3


def test_bayes_and_random_specs_share_a_log_uniform_learning_rate():
    for name in ("lora_bayes.yaml", "lora_random.yaml"):
        spec = sweep.load_spec(REPO / "sweeps" / name)
        assert spec.swept["method.optimizer.lr"] == FloatDistribution(5.0e-5, 1.0e-3, log=True)
        assert spec.swept["method.lora.r"] == CategoricalDistribution([4, 8, 16, 32])
        with pytest.raises(UserError, match="needs --count"):
            sweep._count(spec, None)


@pytest.mark.parametrize("block,expected", [
    ({"min": 1, "max": 4}, IntDistribution(1, 4)),                      # W&B: integer bounds -> int_uniform
    ({"min": 0.1, "max": 1}, FloatDistribution(0.1, 1)),                # a float bound -> uniform
    ({"distribution": "log_uniform_values", "min": 1.0e-5, "max": 1.0e-2}, FloatDistribution(1e-5, 1e-2, log=True)),
    ({"distribution": "int_uniform", "min": 2, "max": 64}, IntDistribution(2, 64)),
    ({"distribution": "categorical", "values": ["a", "b"]}, CategoricalDistribution(["a", "b"])),
    ({"values": [8, 16]}, CategoricalDistribution([8, 16])),
])
def test_wandb_parameters_map_to_optuna_distributions(block, expected):
    assert sweep.parse_parameter("x", block).distribution == expected


def test_constants_and_quantized_values_follow_wandb():
    assert sweep.parse_parameter("x", {"value": 3}).pick({}) == 3
    q_float = sweep.parse_parameter("x", {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.1})
    assert q_float.pick({"x": 0.34}) == 0.3
    q_int = sweep.parse_parameter("x", {"distribution": "q_log_uniform_values", "min": 8, "max": 256, "q": 8})
    assert q_int.distribution.log and q_int.pick({"x": 37.9}) == 40 and type(q_int.pick({"x": 37.9})) is int


@pytest.mark.parametrize("block,expected", [
    ({"distribution": "normal", "mu": 0, "sigma": 1}, "distribution 'normal' is not supported"),
    ({"distribution": "log_uniform", "min": -9, "max": -3}, "distribution 'log_uniform' is not supported"),
    ({"parameters": {"r": {"values": [1]}}}, "nested parameters are not supported"),
    ({"min": "1e-4", "max": 1.0e-3}, "write 1.0e-4"),
    ({"distribution": "log_uniform_values", "min": 0.0, "max": 1.0}, "x:"),
    ({"values": [8], "probabilities": [1.0]}, "probabilities not allowed"),
])
def test_unsupported_parameters_are_one_user_error_naming_them(block, expected):
    with pytest.raises(UserError, match="parameter x") as error:
        sweep.parse_parameter("x", block)
    assert expected in str(error.value) and "\n" not in str(error.value)


def write_spec(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


GOOD = "method: {method}\nmetric: {{name: val/accuracy, goal: maximize}}\nparameters: {{{params}}}\n"


@pytest.mark.parametrize("text,argv,expected", [
    (None, [], "not found"),
    ("method: [grid", [], "not valid YAML"),
    ("method: grid\nparameters: {method.lora.r: {values: [8]}}\n", [], "metric.name is missing"),
    ("method: grid\nmetric: {name: accuracy, goal: maximize}\nparameters: {method.lora.r: {values: [8]}}\n", [],
     "metric.name=accuracy is not a metric llmtune logs"),
    ("method: grid\nmetric: {name: val/accuracy}\nparameters: {method.lora.r: {values: [8]}}\n", [],
     "metric.goal=None"),
    (GOOD.format(method="grid", params="method.lora.r: {values: [8]}") + "early_terminate: {type: hyperband}\n", [],
     "early_terminate is not supported"),
    (GOOD.format(method="grid", params="method.lora.r: {min: 4, max: 8}"), [], "a grid needs `values` or `value`"),
    (GOOD.format(method="bayes", params="method.lora.r: {values: [8]}"), [], "needs --count"),
    (GOOD.format(method="grid", params="method.lora.lora_alpa: {values: [8]}"), [], "did you mean 'method.lora.lora_alpha'"),
    (GOOD.format(method="grid", params="method: {values: [instruct, causl]}"), [], "method=causl is not a known"),
    (GOOD.format(method="grid", params="method.lora.r: {values: [8]}"), ["method.lora.r=4"], "conflicts"),
    (GOOD.format(method="grid", params="method.lora.r: {values: [8]}") + "command:\n- python\n- train.py\n- ${args}\n",
     [], "${args_no_hyphens}"),
])
def test_bad_spec_or_arguments_stop_before_any_trial(tmp_path, monkeypatch, text, argv, expected):
    monkeypatch.setattr(sweep, "launch_llmtune", lambda args: pytest.fail("a trial was launched"))
    spec = write_spec(tmp_path, text) if text is not None else str(tmp_path / "missing.yaml")
    with pytest.raises(UserError) as error:
        sweep.main([spec, "--dir", str(tmp_path / "out"), *argv])
    assert expected in str(error.value) and "\n" not in str(error.value)


def fake_llmtune(calls: list[list[str]]):
    """A launcher that writes what a run would: value = r/100 + alpha/1000 + lr; r=16 with alpha=32 crashes."""
    def launch(args: list[str]) -> int:
        calls.append(args)
        overrides = dict(arg.split("=", 1) for arg in args)
        run_dir = Path(overrides["hydra.run.dir"].strip("'"))
        run_dir.mkdir(parents=True)
        r, alpha, lr = (float(overrides[k]) for k in ("method.lora.r", "method.lora.lora_alpha", "method.optimizer.lr"))
        if r == 16 and alpha == 32:
            (run_dir / "status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
            return 1
        (run_dir / "status.json").write_text(json.dumps({"status": "completed", "error": None}))
        logged = {name: 0.0 for name in FINAL_METRICS} | {"val/accuracy": r / 100 + alpha / 1000 + lr}
        (run_dir / "metrics.json").write_text(json.dumps({"logged": logged}))
        return 0
    return launch


def test_runner_records_every_trial_and_goes_on_after_a_failure(tmp_path):
    calls = []
    spec = sweep.load_spec(GRID)
    record = sweep.run_sweep(spec, 8, tmp_path, ["model=tiny", "logger=csv"], 0, fake_llmtune(calls))

    assert len(calls) == 8  # the two crashing trials did not stop the sweep
    for args in calls:
        assert "logger=csv" in args and "logger=wandb" not in args and "model=tiny" in args
        assert args[-1].startswith("hydra.run.dir=")
    trials = record["trials"]
    failed = [t for t in trials if t["status"] == "failed"]
    assert len(failed) == 2 and all(t["value"] is None and "exit code 1: boom" in t["error"] for t in failed)
    for trial in trials:
        params = trial["params"]
        if trial["status"] == "completed":
            expected = params["method.lora.r"] / 100 + params["method.lora.lora_alpha"] / 1000
            assert trial["value"] == pytest.approx(expected + params["method.optimizer.lr"])
        assert (tmp_path / trial["dir"]).is_dir() and trial["dir"].startswith(f"{trial['number']:02d}_r=")
    best = record["trials"][record["best"]]["params"]
    assert (best["method.lora.r"], best["method.lora.lora_alpha"], best["method.optimizer.lr"]) == (16, 16, 3.0e-4)
    assert json.loads((tmp_path / "sweep.json").read_text()) == json.loads(json.dumps(record))
    assert record["engine"].startswith("optuna") and record["spec"]["method"] == "grid"

    minimize = sweep.run_sweep(replace(spec, goal="minimize"), 8, tmp_path / "min", [], 0, fake_llmtune([]))
    best = minimize["trials"][minimize["best"]]["params"]
    assert (best["method.lora.r"], best["method.lora.lora_alpha"], best["method.optimizer.lr"]) == (8, 16, 1.0e-4)
    ranked = sweep.ranked(minimize["trials"], "minimize")
    values = [t["value"] for t in ranked if t["value"] is not None]
    assert values == sorted(values) and ranked[-1]["status"] == "failed"


def test_bayes_search_samples_inside_the_space(tmp_path):
    spec = sweep.load_spec(REPO / "sweeps" / "lora_bayes.yaml")
    record = sweep.run_sweep(spec, 14, tmp_path, [], 0, fake_llmtune([]))  # past TPE's 10 random start-up trials
    for trial in record["trials"]:
        params = trial["params"]
        assert params["method.lora.r"] in (4, 8, 16, 32) and params["method.lora.lora_alpha"] in (8, 16, 32, 64)
        assert 5.0e-5 <= params["method.optimizer.lr"] <= 1.0e-3
    assert "TPESampler" in record["engine"] and record["best"] is not None


@pytest.mark.parametrize("files,returncode,expected", [
    ({}, 0, "status missing"),
    ({"status.json": {"status": "running"}}, 0, "status running"),
    ({"status.json": {"status": "completed"}, "metrics.json": {"logged": {"test/accuracy": 0.9}}}, 0,
     "metrics.json logs no finite val/accuracy (logged: test/accuracy)"),
    ({"status.json": {"status": "completed"}, "metrics.json": {"logged": {"val/accuracy": 0.9}}}, 137, "exit code 137"),
])
def test_a_trial_without_its_metric_counts_as_failed(tmp_path, files, returncode, expected):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    value, error = sweep.read_result(tmp_path, returncode, "val/accuracy")
    assert value is None and expected in error


def test_hydra_values_read_back_unchanged():
    assert sweep.as_overrides({"a": 1.0e-5, "b": True, "c": None, "d": "instruct", "e": "two words", "f": "8"}) == [
        "a=1e-05", "b=true", "c=null", "d=instruct", "e='two words'", "f='8'"]
    assert sweep.hydra_value("/tmp/x/00_r=8") == "'/tmp/x/00_r=8'"  # '=' would break Hydra's parser unquoted


def test_trial_dir_names_are_short_unique_and_safe():
    params = {"method.lora.r": 8, "other.r": 2, "method.optimizer.lr": 1.0e-4, "dataset.path": "a/b c"}
    assert sweep.trial_dir_name(3, params) == "03_method.lora.r=8_other.r=2_lr=0.0001_path=a-b-c"


def test_all_trials_failing_exits_1_with_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "launch_llmtune", lambda args: 1)
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(GRID), "--count", "2", "--dir", str(tmp_path), "logger=csv"])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "trial 0 (1/2): method.lora.r=" in out and "all 2 trials failed" in out and f"llmtune report {tmp_path}" in out


def test_real_tiny_sweep_end_to_end(tmp_path, cache_dir):
    sweep.main([str(GRID), "--count", "2", "--dir", str(tmp_path), "model=tiny", "trainer.max_epochs=1",
                "logger=csv", "dataset.split.train_per_class=10", "dataset.split.val_per_class=5",
                "dataset.split.test_per_class=5"])
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["completed", "completed"], record["trials"]
    for trial in record["trials"]:
        run_dir = tmp_path / trial["dir"]
        logged = json.loads((run_dir / "metrics.json").read_text())["logged"]
        assert trial["value"] == logged["val/accuracy"] and math.isfinite(trial["value"])
        config = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"method.lora.r={trial['params']['method.lora.r']}" in config and "logger=csv" in config
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_an_interrupted_sweep_resumes_without_running_a_finished_trial_again(tmp_path):
    spec = sweep.load_spec(GRID)
    calls, whole = [], sweep.run_sweep(spec, 8, tmp_path / "whole", [], 0, fake_llmtune([]))
    launch = fake_llmtune(calls)

    def killed_after_three(args):
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C, or the machine going away, during the fourth trial
        return launch(args)

    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(spec, 8, tmp_path / "cut", [], 0, killed_after_three)
    earlier = json.loads((tmp_path / "cut" / "sweep.json").read_text())
    assert len(earlier["trials"]) == 3
    resumed = sweep.run_sweep(spec, 8, tmp_path / "cut", [], 0, launch, earlier=earlier)
    assert len(calls) == 8  # 3 before the interruption, 5 after: none twice
    assert [t["number"] for t in resumed["trials"]] == list(range(8))
    assert [t["params"] for t in resumed["trials"]] == [t["params"] for t in whole["trials"]]
    assert resumed["best"] == whole["best"]
