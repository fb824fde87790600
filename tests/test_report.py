"""`llmtune report DIR` on fabricated run folders whose metrics are known by construction."""

import copy
import json
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from omegaconf import OmegaConf

from llmtune.errors import UserError
from llmtune.evaluation.intervals import bootstrap_intervals, classification_statistics
from llmtune.evaluation.metrics import classification_metrics
from llmtune.report.compare import config_groups, main
from llmtune.report.figures import heatmap_table
from llmtune.report.params import distinct_params, flatten_config, short_names
from llmtune.report.significance import discordant_counts, mcnemar_exact, mcnemar_p
from llmtune.tracking import final_metrics

LABELS = ["positive", "negative", "neutral"]
IDS = [f"row-{i}" for i in range(20)]
GOLD = [LABELS[i % 3] for i in range(20)]  # 20 test rows: each wrong row costs exactly 0.05 accuracy

# The resolved config a run writes to config.yaml (trimmed to the keys that matter here).
CONFIG = {
    "model": {"name": "tiny", "dtype": "float32", "lora": {"target_modules": "all-linear"}},
    "method": {"name": "instruct", "loss_on": "answer", "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
               "optimizer": {"lr": 1e-4, "weight_decay": 0.0}},
    "dataset": {"name": "sentiment_demo", "labels": LABELS},
    "retriever": {"name": "none"},
    "trainer": {"batch_size": 8, "max_epochs": 1, "default_root_dir": "RUN_DIR"},
    "logger": {"_target_": "llmtune.tracking.wandb_logger", "name": "run-name-with-seed", "save_dir": "RUN_DIR"},
    "eval": {"baseline": True, "batch_size": 16},
    "rag": False, "seed": 1, "tags": [],
    "paths": {"cache_dir": "/tmp/cache", "output_dir": "RUN_DIR"},
}


def fabricate_run(run_dir: Path, overrides: dict | None = None, wrong: set[int] = frozenset(),
                  base_wrong: set[int] | None = None, status: str = "completed", error: str | None = None,
                  legacy: bool = False) -> Path:
    """A run folder per the contract: config.yaml, status.json, metrics.json, predictions.jsonl.

    The tuned model is wrong exactly on the rows in `wrong` (accuracy = 1 - len(wrong) / 20), the base model on
    `base_wrong` (None: the base was not scored). legacy=True writes the older format: only .hydra/config.yaml
    (unresolved), and metrics.json without "logged"; no status.json.
    """
    config = copy.deepcopy(CONFIG)
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    run_dir.mkdir(parents=True)
    if legacy:
        config["trainer"]["default_root_dir"] = config["paths"]["output_dir"] = "${hydra:runtime.output_dir}"
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    else:
        config["trainer"]["default_root_dir"] = config["paths"]["output_dir"] = str(run_dir)  # resolved: per run
        config["logger"]["save_dir"] = str(run_dir)
        config["logger"]["name"] = f"tiny-seed={config['seed']}"
        OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
        state = {"status": status, "error": error, "started": "2026-01-01T00:00:00+00:00",
                 "finished": None if status == "running" else "2026-01-01T00:01:00+00:00"}
        (run_dir / "status.json").write_text(json.dumps(state))
    if status != "completed":
        return run_dir

    def predict(wrong_rows):
        return [LABELS[(LABELS.index(gold) + 1) % 3] if i in wrong_rows else gold for i, gold in enumerate(GOLD)]

    tuned = predict(wrong)
    results = {"tuned": classification_metrics(tuned, GOLD, LABELS), "val": classification_metrics(GOLD, GOLD, LABELS)}
    if not legacy:
        results["tuned"]["intervals"] = bootstrap_intervals(classification_statistics(tuned, GOLD, LABELS), len(GOLD))
    rows = [{"id": row, "text": f"text {row}", "gold": gold, "predicted": predicted, "scores": {}}
            for row, gold, predicted in zip(IDS, GOLD, tuned)]
    if base_wrong is not None:
        base = predict(base_wrong)
        results["base"] = classification_metrics(base, GOLD, LABELS)
        for row, predicted in zip(rows, base):
            row["base_predicted"], row["base_scores"] = predicted, {}
    summary = {"run": {"model": config["model"]["name"], "seed": config["seed"]}, "results": results,
               "train": {"epochs": 1, "steps": 10, "tokens": 5000, "tokens_per_s": 500.0},
               "timing_s": {"prepare": 1.0, "train": 10.0, "eval_tuned": 1.0, "total": 12.0}}
    if legacy:
        del results["val"]
    else:
        summary["logged"] = final_metrics(results)
    (run_dir / "metrics.json").write_text(json.dumps(summary))
    (run_dir / "predictions.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return run_dir


def wrong_rows(count: int, start: int = 0) -> set[int]:
    return set(range(start, start + count))


def section(report: str, title: str) -> str:
    """The text of one '## title' section of report.md."""
    return report.split(f"## {title}")[1].split("\n## ")[0]


def assert_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300 and image.shape[2] in (3, 4)


# --- an lr sweep over 3 seeds, as a Hydra multirun, with one failed and one killed run ------------------------

@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("multirun") / "2026-01-01" / "00-00-00"

    def run(index, lr, seed, **kwargs):
        return fabricate_run(root / f"{index}_tiny-instruct-rag=False", {"method.optimizer.lr": lr, "seed": seed},
                             **kwargs)

    # Folder order differs from the ranking on purpose. Accuracies: lr 1e-3: 0.95 0.90 0.85; lr 1e-4: 0.80 0.70 0.60;
    # lr 1e-2: 0.50. Base vs tuned: 1e-4/seed 1 has b = c = 4; 1e-4/seed 2 has b = 1 (row 6), c = 6 (rows 0-5).
    run(0, 1e-2, 1, wrong=wrong_rows(10))
    run(1, 1e-4, 1, wrong={1, 2, 3, 4}, base_wrong={5, 6, 7, 8})
    run(2, 1e-4, 2, wrong=wrong_rows(6), base_wrong={6})
    run(3, 1e-4, 3, wrong=wrong_rows(8))
    run(4, 1e-3, 1, wrong={0})
    run(5, 1e-3, 2, wrong=wrong_rows(2))
    run(6, 1e-3, 3, wrong=wrong_rows(3))
    run(7, 1e-1, 1, status="failed", error="loss became NaN at step 3; lower method.optimizer.lr")
    run(8, 1e-1, 2, status="running")
    # Not a run: a run's own subfolders are never searched (this would add a 10th "run").
    (root / "4_tiny-instruct-rag=False" / "logs").mkdir()
    (root / "4_tiny-instruct-rag=False" / "logs" / "metrics.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def lr_report(lr_sweep):
    main([str(lr_sweep)])
    return lr_sweep, (lr_sweep / "report.md").read_text(), pd.read_csv(lr_sweep / "results.csv")


def test_results_csv_ranks_completed_runs_then_lists_failed_and_incomplete(lr_report):
    _, _, table = lr_report
    assert table["run"].str[0].tolist() == ["4", "5", "6", "1", "2", "3", "0", "7", "8"]
    assert table["status"].tolist() == ["completed"] * 7 + ["failed", "incomplete"]
    assert table["test/accuracy"][:7].tolist() == pytest.approx([0.95, 0.90, 0.85, 0.80, 0.70, 0.60, 0.50])
    assert table["error"][7] == "loss became NaN at step 3; lower method.optimizer.lr"
    assert "never finished" in table["error"][8]


def test_only_seed_and_lr_vary(lr_report):
    _, report, table = lr_report
    # model.name, method.lora.r... are equal everywhere; paths.*, trainer.default_root_dir (= paths.output_dir) and
    # logger.* differ per run but say where a run lived and logged, not what it did.
    assert table.columns[:4].tolist() == ["run", "status", "method.optimizer.lr", "seed"]
    assert ("| # | run | lr | seed | test/accuracy [95% interval] | base/test_accuracy | McNemar p (base vs tuned) |"
            in report)
    # each run's own interval beside its accuracy, as results.csv holds it
    best = table.sort_values("test/accuracy", ascending=False).iloc[0]
    assert best["interval_low"] < best["test/accuracy"] < best["interval_high"]
    assert f"| {best['test/accuracy']:.3f} [{best['interval_low']:.3f}, {best['interval_high']:.3f}] |" in report


def test_mean_and_sample_std_over_seeds(lr_report):
    _, report, table = lr_report
    groups = config_groups(table[table["status"] == "completed"], ["method.optimizer.lr"], "test/accuracy")
    assert groups["method.optimizer.lr"].tolist() == [1e-3, 1e-4, 1e-2]
    assert groups["mean"].tolist() == pytest.approx([0.90, 0.70, 0.50])
    # ddof=1: sqrt(((0.95-0.9)^2 + 0 + (0.85-0.9)^2) / 2) = 0.05; sqrt((0.1^2 + 0 + 0.1^2) / 2) = 0.1
    assert groups["std"][:2].tolist() == pytest.approx([0.05, 0.10])
    assert groups["n"].tolist() == [3, 3, 1]
    seeds = section(report, "Mean ± std over seeds")
    assert "| 0.001 | 3 | 0.900 ± 0.050 |" in seeds
    assert "| 0.0001 | 3 | 0.700 ± 0.100 |" in seeds
    assert "| 0.01 | 1 | 0.500 ± - |" in seeds


def test_mcnemar_base_vs_tuned_per_run(lr_report):
    _, _, table = lr_report
    p = dict(zip(table["run"].str[0], table["mcnemar_p_base_vs_tuned"]))
    assert p["2"] == pytest.approx(0.125)  # b=1, c=6: 2 * (1 + 7) / 2**7
    assert p["1"] == 1.0  # b = c
    assert pd.isna(p["4"])  # base not scored


def test_best_config_vs_runner_up_on_the_first_shared_seed(lr_report):
    _, report, _ = lr_report
    line = section(report, "Best config vs runner-up")
    # lr 1e-3 seed 1 is wrong on row 0, lr 1e-4 seed 1 on rows 1-4: b=4, c=1, p = 2 * (1 + 5) / 2**5 = 0.375
    assert "Best config (lr=0.001) vs runner-up (lr=0.0001), seed 1, same 20 test rows" in line
    assert "best right and runner-up wrong on 4 rows, the opposite on 1; McNemar exact p = 0.375" in line
    assert "**not significant** at 0.05" in line


def test_failed_and_incomplete_runs_are_listed_not_ranked(lr_report):
    _, report, _ = lr_report
    assert "9 runs (7 completed / 1 failed / 0 killed / 1 incomplete)" in report
    ranking = section(report, "Runs ranked by test/accuracy")
    problems = section(report, "Failed, killed and incomplete runs")
    assert "7_tiny" not in ranking and "8_tiny" not in ranking
    assert "| 7_tiny-instruct-rag=False | failed | loss became NaN at step 3; lower method.optimizer.lr |" in problems
    assert "| 8_tiny-instruct-rag=False | incomplete | started 2026-01-01T00:00:00+00:00 and never finished" in problems


def test_lr_sweep_figures(lr_report):
    root, report, _ = lr_report
    figures = section(report, "Figures")
    assert "No heatmap: it needs two varying parameters besides seed, and 1 vary" in figures
    assert not (root / "heatmap.png").exists()
    linked = [line.split("](")[1].rstrip(")") for line in figures.splitlines() if line.startswith("![")]
    assert linked == ["confusion_matrices.png", "metric_vs_method.optimizer.lr.png"]
    for name in linked:
        assert_png(root / name)


def test_console_prints_the_ranking_and_the_report_path(lr_sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # rich folds long cells to the terminal width
    main([str(lr_sweep), "--metric", "test/macro_f1", "--out", str(tmp_path / "by-f1")])
    printed = capsys.readouterr().out
    assert "Runs ranked by test/macro_f1" in printed and "4_tiny-instruct-rag=False" in printed
    assert f"report: {tmp_path / 'by-f1' / 'report.md'}\n" in printed
    assert (tmp_path / "by-f1" / "results.csv").exists() and not (tmp_path / "by-f1" / "heatmap.png").exists()


# --- a model x method grid over 4 seeds, as a local sweep folder ----------------------------------------------

@pytest.fixture(scope="module")
def grid_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps") / "2026-01-01" / "00-00-00_grid"
    root.mkdir(parents=True)
    (root / "sweep.json").write_text("{}")
    errors = {("gemma3_270m", "instruct"): 0, ("tiny", "instruct"): 2, ("gemma3_270m", "causal"): 4,
              ("tiny", "causal"): 6}
    index = 0
    for (model, method), base_errors in errors.items():
        for seed in (1, 2, 3, 4):
            # the seed adds seed - 1 wrong rows: mean over seeds = (20 - errors - 1.5) / 20
            fabricate_run(root / f"{index:02d}_{model}-{method}-seed={seed}",
                          {"model.name": model, "method.name": method, "seed": seed,
                           "model.dtype": "bfloat16" if model == "gemma3_270m" else "float32"},
                          wrong=wrong_rows(base_errors + seed - 1))
            index += 1
    main([str(root)])
    return root, (root / "report.md").read_text(), pd.read_csv(root / "results.csv")


def test_heatmap_over_model_and_method(grid_report):
    root, report, table = grid_report
    grid = heatmap_table(table, "model.name", "method.name", "test/accuracy")
    assert grid.index.tolist() == ["gemma3_270m", "tiny"] and grid.columns.tolist() == ["causal", "instruct"]
    assert grid.to_numpy().tolist() == [pytest.approx([0.725, 0.925]), pytest.approx([0.625, 0.825])]
    assert "![test/accuracy over model × method](heatmap.png)" in report
    assert_png(root / "heatmap.png")


def test_grid_params_confusion_limit_and_no_numeric_param(grid_report):
    root, report, table = grid_report
    # model.dtype changes with model.name: kept in results.csv, folded into model elsewhere.
    assert table.columns[2:6].tolist() == ["model.name", "method.name", "model.dtype", "seed"]
    assert "`model.dtype` (with model)" in report
    assert "| # | run | model | method | seed | test/accuracy [95% interval] |" in report
    assert "Confusion matrices of the best 12 runs; 4 more left out." in report
    assert "No metric-vs-parameter plot" in report
    assert_png(root / "confusion_matrices.png")


# --- a single run, in the older format ------------------------------------------------------------------------

@pytest.fixture
def legacy_run(tmp_path):
    run_dir = fabricate_run(tmp_path / "03-27-15_gemma3_270m-instruct-rag=False", wrong=wrong_rows(3), legacy=True)
    (run_dir / "report.md").write_text("the run's own report\n")
    return run_dir


def test_single_legacy_run(legacy_run):
    main([str(legacy_run)])
    # The comparison goes beside the run's own report.md, not over it.
    assert (legacy_run / "report.md").read_text() == "the run's own report\n"
    out = legacy_run / "comparison"
    table = pd.read_csv(out / "results.csv")
    assert table["run"].tolist() == [legacy_run.name] and table["status"].tolist() == ["completed"]
    assert table["test/accuracy"][0] == pytest.approx(0.85)  # from results.tuned: no "logged" in old runs
    assert table["val/accuracy"].isna().all() and table["mcnemar_p_base_vs_tuned"].isna().all()
    report = (out / "report.md").read_text()
    assert "1 runs (1 completed / 0 failed / 0 killed / 0 incomplete)" in report
    assert "Varying parameters: none" in report and "No heatmap" in report
    assert_png(out / "confusion_matrices.png")


# --- bad input ------------------------------------------------------------------------------------------------

def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        main([str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match=r"no runs under .*status\.json or metrics\.json"):
        main([str(tmp_path)])


def test_unknown_or_unlogged_metric(legacy_run):
    with pytest.raises(UserError, match=r"unknown metric 'test/acc'; pass --metric with one of: val/accuracy"):
        main([str(legacy_run), "--metric", "test/acc"])
    with pytest.raises(UserError, match=r"no completed run .* logged base/test_accuracy.*: test/accuracy, test/mac"):
        main([str(legacy_run), "--metric", "base/test_accuracy"])


def test_bad_axes(tmp_path):
    fabricate_run(tmp_path / "a", {"method.lora.r": 8})
    fabricate_run(tmp_path / "b", {"method.lora.r": 16})
    with pytest.raises(UserError, match=r"'method.lora.rank' is not a config key .* did you mean method.lora.r\?"):
        main([str(tmp_path), "--axes", "model.name,method.lora.rank"])
    with pytest.raises(UserError, match="two different config keys"):
        main([str(tmp_path), "--axes", "model.name"])
    assert not (tmp_path / "report.md").exists()


# --- pieces -------------------------------------------------------------------------------------------------

def test_mcnemar_exact():
    assert mcnemar_exact(1, 6) == pytest.approx(0.125) == mcnemar_exact(6, 1)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 2**10)
    a, b = {"x": True, "y": True, "z": False}, {"x": False, "y": True, "z": True}
    assert discordant_counts(a, b) == (1, 1) and mcnemar_p(a, b) == 1.0
    with pytest.raises(ValueError, match="different test ids"):
        discordant_counts(a, {"x": True})


def test_flatten_config_and_names():
    flat = flatten_config({"model": {"name": "tiny"}, "method": {"lora": {"r": 8}}, "tags": ["a", "b"],
                           "paths": {"output_dir": "/x"}, "hydra": {"job": {}}, "logger": {"name": "x"}})
    assert flat == {"model.name": "tiny", "method.lora.r": 8, "tags": '["a", "b"]'}
    assert short_names(["model.name", "method.name", "method.lora.r", "a.r"]) == {
        "model.name": "model", "method.name": "method", "method.lora.r": "method.lora.r", "a.r": "a.r"}
    table = pd.DataFrame({"model.name": ["a", "b", "a"], "model.hub_id": ["x", None, "x"], "seed": [1, 2, 1]})
    assert distinct_params(table, ["model.name", "model.hub_id", "seed"]) == (["model.name", "seed"],
                                                                              {"model.hub_id": "model.name"})


def test_a_sweep_folder_is_ranked_by_its_own_metric_with_the_test_score_beside_it(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({"metric": {"name": "val/accuracy", "goal": "maximize"}}))
    fabricate_run(root / "00_lr=0.0001", {"method.optimizer.lr": 1e-4}, wrong=wrong_rows(4), base_wrong=set())
    fabricate_run(root / "01_lr=0.001", {"method.optimizer.lr": 1e-3}, wrong=wrong_rows(2), base_wrong=set())
    main([str(root)])
    ranking = section((root / "report.md").read_text(), "Runs ranked by val/accuracy")
    header = next(line for line in ranking.splitlines() if line.startswith("| #"))
    assert header.split(" | ")[-4:] == ["val/accuracy [95% interval]", "test/accuracy", "base/test_accuracy",
                                        "McNemar p (base vs tuned) |"]
    assert "| 1.000 | 0.800 | 1.000 |" in ranking and "| 1.000 | 0.900 | 1.000 |" in ranking


def test_a_numeric_setting_only_failed_runs_had_still_gives_a_report(tmp_path, monkeypatch, capsys):
    import test_report

    fabricate_run(tmp_path / "0_run", {"seed": 1})
    fabricate_run(tmp_path / "1_run", {"seed": 2})
    monkeypatch.setitem(test_report.CONFIG["trainer"], "warmup_steps", 5)  # a key only the failed runs have
    fabricate_run(tmp_path / "2_run", {"seed": 3, "trainer.warmup_steps": 0.5}, status="failed", error="boom")
    fabricate_run(tmp_path / "3_run", {"seed": 4, "trainer.warmup_steps": 2.0}, status="failed", error="boom")
    from llmtune.report.compare import main

    main([str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "no completed run sets `trainer.warmup_steps`" in report and "| 2_run | failed | boom |" in report
