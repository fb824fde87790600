"""`llmtune report DIR`: compare every run under DIR: ranking, mean ± std over seeds, significance, figures.

Writes results.csv (one row per run), report.md and its figures into DIR (or --out), and prints the ranking.
"""

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from llmtune.cli import option, parse, positional
from llmtune.errors import UserError
from llmtune.report import figures, params
from llmtune.files import write_atomic
from llmtune.report.runs import RANKABLE_METRICS, RUN_MARKERS, Run, find_run_dirs, read_run_record
from llmtune.report.significance import discordant_counts, mcnemar_exact, mcnemar_p

SIGNIFICANCE_LEVEL = 0.05
# The ranking metric's 95% bootstrap interval (each run's own, over its test rows)
INTERVAL_COLUMNS = ("interval_low", "interval_high")
CONSOLE_ROWS = 20


@dataclass(frozen=True)
class ReportArgs:
    """Compare every run under DIR: ranking, mean ± std over seeds, significance, figures; writes results.csv,
    report.md and the figures into DIR (or out=DIR) and prints the ranking."""

    dir: Path = positional("a run folder, a Hydra multirun or sweep folder, or outputs/", metavar="DIR")
    # A plain string, not a choice: main names the metrics with its own hint, also for a metric no run logged.
    metric: str | None = option(None, "rank by this metric, higher is better (a name alone is the tuned model's "
                                f"test metric, e.g. judge_correctness): {', '.join(RANKABLE_METRICS)}",
                                metavar="METRIC", default_text="a sweep's own metric from its sweep.json, else "
                                                               "test/accuracy, or test/rougeL for Q&A runs")
    axes: str | None = option(None, "two config keys for the heatmap, e.g. model.name,method.lora.r",
                              metavar="KEY,KEY", default_text="the first two varying parameters other than seed")
    out: Path | None = option(None, "folder for the report", metavar="DIR", default_text="DIR")


def parse_args(argv: list[str]) -> ReportArgs:
    return parse(ReportArgs, argv, "report")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    root = args.dir
    chosen = args.metric and metric_name(args.metric)
    runs = load_runs(root)
    metric = chosen or sweep_metric(root) or default_metric(runs)
    check_metric_logged(runs, metric, root)
    varying = params.varying_params([run.config for run in runs])
    requested_axes = heatmap_axes(args.axes, varying, runs, root)
    out_dir = output_dir(args.out, root)

    # One row per run; completed runs that logged the metric are ranked, best first, the others follow.
    table = runs_table(runs, varying + [key for key in requested_axes or [] if key not in varying], metric)
    ranked = table[(table["status"] == "completed") & table[metric].notna()]
    # results.csv keeps every varying key; report.md, the figures and the console show those that tell runs apart.
    shown, follows = params.distinct_params(table, varying)
    factors = [key for key in shown if key != "seed"]  # what makes a config; seeds are averaged over
    axes = requested_axes or (factors[:2] if len(factors) >= 2 else None)
    names = params.short_names(shown + [key for key in axes or [] if key not in shown])
    groups = config_groups(ranked, factors, metric)
    runs_by_name = {run.name: run for run in runs}

    csv_columns = ["run", "status", *varying, *RANKABLE_METRICS, *INTERVAL_COLUMNS, "mcnemar_p_base_vs_tuned",
                   "train_tokens_per_s", "total_s", "error"]
    write_atomic(out_dir / "results.csv", table[csv_columns].to_csv(index=False))
    lines = header(root, table, metric, shown, follows, names)
    lines += ranking_section(ranked, shown, names, metric)
    lines += seeds_section(groups, factors, names, metric)
    lines += paired_section(groups, runs_by_name, factors, names)
    lines += problems_section(table)
    lines += ["## Figures", ""]
    lines += heatmap_figure(out_dir, table, axes, names, metric, factors)
    lines += confusion_figure(out_dir, ranked, runs_by_name, shown, names)
    lines += metric_vs_param_figures(out_dir, ranked, factors, names, metric)
    write_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
    print_ranking(ranked, shown, names, metric, out_dir / "report.md")


# --- Input ------------------------------------------------------------------------------------------------------

def load_runs(root: Path) -> list[Run]:
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass a run folder or a folder of runs, e.g. outputs/multirun/"
                        f"<date>/<time>")
    runs = [read_run_record(path, root) for path in find_run_dirs(root)]
    if not runs:
        raise UserError(f"no runs under {root} (no folder there has {' or '.join(RUN_MARKERS)}); pass the folder "
                        f"that a run, a multirun (-m) or `llmtune sweep` wrote, e.g. outputs/")
    return runs


def metric_name(given: str) -> str:
    """The ranking metric given as metric=: a full name (test/rougeL, base/test_judge_correctness), or a name alone
    for the tuned model's test metric (judge_correctness -> test/judge_correctness)."""
    name = given if "/" in given else f"test/{given}"
    if name not in RANKABLE_METRICS:
        raise UserError(f"unknown metric {given!r}; pass --metric with one of: {', '.join(RANKABLE_METRICS)}")
    return name


def sweep_metric(root: Path) -> str | None:
    """The metric an `llmtune sweep` folder optimised (its sweep.json), so its report ranks trials the same way."""
    try:
        return json.loads((root / "sweep.json").read_text(encoding="utf-8"))["metric"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_metric(runs: list[Run]) -> str:
    """test/accuracy, or for folders of Q&A runs only (nothing logged accuracy), test/rougeL."""
    if any("test/rougeL" in run.metrics for run in runs) and not any("test/accuracy" in run.metrics for run in runs):
        return "test/rougeL"
    return "test/accuracy"


def check_metric_logged(runs: list[Run], metric: str, root: Path) -> None:
    completed = [run for run in runs if run.status == "completed"]
    if completed and not any(metric in run.metrics for run in completed):
        logged = [name for name in RANKABLE_METRICS if any(name in run.metrics for run in completed)]
        raise UserError(f"no completed run under {root} logged {metric} (base/* needs eval.baseline=true, val/* a "
                        f"newer run, */*judge_* a Q&A run with eval.judge.url); pass --metric with one they did: "
                        f"{', '.join(logged)}")


def heatmap_axes(option: str | None, varying: list[str], runs: list[Run], root: Path) -> list[str] | None:
    """The two config keys of --axes, checked; None without --axes."""
    if option is None:
        return None
    keys = [key.strip() for key in option.split(",") if key.strip()]
    if len(keys) != 2 or keys[0] == keys[1]:
        raise UserError(f"--axes takes two different config keys separated by a comma, e.g. "
                        f"--axes model.name,method.lora.r (got {option!r})")
    known = set().union(*(run.config for run in runs))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"--axes: {key!r} is not a config key of the runs under {root}; {hint}"
                            f"varying keys: {', '.join(varying) or 'none'}")
    return keys


def output_dir(out: Path | None, root: Path) -> Path:
    def is_run(folder):
        return any((folder / marker).is_file() for marker in RUN_MARKERS)
    if out is None:
        # A single run's folder has its own report.md: put the comparison beside it, not over it.
        out = root / "comparison" if is_run(root) else root
    elif is_run(out):
        raise UserError(f"--out {out} is a run folder; writing there would replace its report.md, pick another")
    out.mkdir(parents=True, exist_ok=True)
    return out


# --- Tables -----------------------------------------------------------------------------------------------------

def runs_table(runs: list[Run], keys: list[str], metric: str) -> pd.DataFrame:
    rows = []
    for run in runs:
        both_scored = run.tuned_correct is not None and run.base_correct is not None
        rows.append({
            "run": run.name, "status": run.status, **{key: run.config.get(key) for key in keys},
            **{name: run.metrics.get(name) for name in RANKABLE_METRICS},
            **dict(zip(INTERVAL_COLUMNS, interval_of(run.summary, metric))),
            "mcnemar_p_base_vs_tuned": mcnemar_p(run.tuned_correct, run.base_correct) if both_scored else None,
            "train_tokens_per_s": run.summary.get("train", {}).get("tokens_per_s"),
            "total_s": run.summary.get("timing_s", {}).get("total"),
            "error": run.error,
        })
    table = pd.DataFrame(rows)
    table[list(RANKABLE_METRICS)] = table[list(RANKABLE_METRICS)].astype(float)
    # Completed runs by the metric (best first), then failed and incomplete ones; ties keep the folder order.
    order = table["status"].ne("completed") | table[metric].isna()
    return table.assign(_later=order).sort_values(["_later", metric], ascending=[True, False], kind="stable",
                                                  na_position="last").drop(columns="_later").reset_index(drop=True)


def interval_of(summary: dict, metric: str) -> tuple[float | None, float | None]:
    """The 95% bootstrap interval the run wrote for metric (test/x: the tuned model's, val/x, base/test_x)."""
    prefix, name = metric.split("/")
    part = {"test": "tuned", "val": "val", "base": "base"}[prefix]
    interval = ((summary.get("results") or {}).get(part) or {}).get("intervals", {}).get(name.removeprefix("test_"))
    return tuple(interval) if interval else (None, None)


def format_with_interval(row: pd.Series, metric: str) -> str:
    low, high = row[INTERVAL_COLUMNS[0]], row[INTERVAL_COLUMNS[1]]
    return format_metric(row[metric]) + ("" if pd.isna(low) else f" [{low:.3f}, {high:.3f}]")


def config_groups(ranked: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """Runs with otherwise identical configs (all varying params but seed): mean, sample std (ddof=1), n, runs."""
    by = keys or [pd.Series("all runs", index=ranked.index, name="config")]
    groups = ranked.groupby(by, dropna=False, sort=False).agg(
        mean=(metric, "mean"), std=(metric, "std"), n=(metric, "count"), runs=("run", list))
    return groups.reset_index().sort_values("mean", ascending=False, kind="stable").reset_index(drop=True)


def base_metric(metric: str) -> str | None:
    """The base model's test counterpart of a tuned metric (test/accuracy or val/accuracy -> base/test_accuracy)."""
    prefix, name = metric.split("/")
    return f"base/test_{name}" if prefix in ("test", "val") else None


def companion_metrics(metric: str) -> list[str]:
    """Columns shown beside the ranking metric: ranked on val/*, the test score is the honest estimate to read."""
    prefix, name = metric.split("/")
    return ([f"test/{name}"] if prefix == "val" else []) + ([base_metric(metric)] if base_metric(metric) else [])


def format_metric(value) -> str:
    return "-" if pd.isna(value) else f"{value:.3f}"


def format_p(p) -> str:
    return "-" if pd.isna(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def clean(cell):
        return str(cell).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(clean(cell) for cell in row) + " |" for row in rows] + [""]


# --- report.md sections -----------------------------------------------------------------------------------------

def header(root: Path, table: pd.DataFrame, metric: str, shown: list[str], follows: dict[str, str],
           names: dict[str, str]) -> list[str]:
    counts = table["status"].value_counts()
    described = ", ".join(f"`{key}` ({names[key]})" for key in shown) or "none (all runs share one config)"
    if follows:
        described += "; changing in step with one of those: " + ", ".join(
            f"`{key}` (with {names[twin]})" for key, twin in follows.items())
    return [f"# Run comparison: `{root}`", "",
            (f"{len(table)} runs ({counts.get('completed', 0)} completed / {counts.get('failed', 0)} failed / "
             f"{counts.get('killed', 0)} killed / {counts.get('incomplete', 0)} incomplete) · metric `{metric}` "
             "(higher is better)"), "",
            f"Varying parameters: {described}. Full values per run: results.csv.", ""]


def ranking_section(ranked: pd.DataFrame, shown: list[str], names: dict[str, str], metric: str) -> list[str]:
    companions = companion_metrics(metric)
    columns = ["#", "run", *(names[key] for key in shown), f"{metric} [95% interval]", *companions,
               "McNemar p (base vs tuned)"]
    rows = [[rank, row["run"], *(params.format_value(row[key]) for key in shown), format_with_interval(row, metric),
             *(format_metric(row[name]) for name in companions), format_p(row["mcnemar_p_base_vs_tuned"])]
            for rank, (_, row) in enumerate(ranked.iterrows(), start=1)]
    return [f"## Runs ranked by {metric}", ""] + (markdown_table(columns, rows) if rows else ["No completed run.", ""])


def seeds_section(groups: pd.DataFrame, keys: list[str], names: dict[str, str], metric: str) -> list[str]:
    if groups.empty:
        return []
    rows = [[*([params.format_value(group[key]) for key in keys] or ["all runs"]), group["n"],
             f"{group['mean']:.3f} ± {format_metric(group['std'])}"] for _, group in groups.iterrows()]
    header = [*([names[key] for key in keys] or ["config"]), "n", f"{metric} mean ± std"]
    return [f"## Mean ± std over seeds ({metric}; sample std, ddof=1)", ""] + markdown_table(header, rows)


def paired_section(groups: pd.DataFrame, runs_by_name: dict[str, Run], factors: list[str],
                   names: dict[str, str]) -> list[str]:
    if len(groups) < 2:
        return []
    return ["## Best config vs runner-up", "", paired_comparison(groups.iloc[0], groups.iloc[1], runs_by_name,
                                                                 factors, names), ""]


def paired_comparison(best: pd.Series, runner_up: pd.Series, runs_by_name: dict[str, Run], factors: list[str],
                      names: dict[str, str]) -> str:
    """McNemar on the two configs' tuned predictions, only where both were scored on the same test rows: with
    several seeds each, the smallest seed they share (the split follows the seed, so other pairs differ in rows)."""
    best_config, runner_up_config = (params.describe(group, factors, names) for group in (best, runner_up))
    title = f"Best config ({best_config}) vs runner-up ({runner_up_config})"
    by_seed = [{runs_by_name[name].config.get("seed"): runs_by_name[name] for name in group["runs"]}
               for group in (best, runner_up)]
    shared = sorted(set(by_seed[0]) & set(by_seed[1]), key=lambda seed: (seed is None, str(seed).zfill(20)))
    if not shared:
        return f"{title}: no paired test possible, they share no seed and so were not scored on the same test rows."
    seed = shared[0]
    run_a, run_b = by_seed[0][seed], by_seed[1][seed]
    if "qa" in (run_a.summary["run"].get("task"), run_b.summary["run"].get("task")):
        return f"{title}: no McNemar test, generated answers are not simply right or wrong."
    if run_a.tuned_correct is None or run_b.tuned_correct is None:
        return f"{title}: no paired test possible, predictions.jsonl is missing ({run_a.name}, {run_b.name})."
    if run_a.tuned_correct.keys() != run_b.tuned_correct.keys():
        return f"{title}: no paired test possible, {run_a.name} and {run_b.name} were scored on different test ids."
    b, c = discordant_counts(run_a.tuned_correct, run_b.tuned_correct)
    p = mcnemar_exact(b, c)
    verdict = "significant" if p < SIGNIFICANCE_LEVEL else "not significant"
    on_seed = f"seed {seed}, " if seed is not None else ""
    return (f"{title}, {on_seed}same {len(run_a.tuned_correct)} test rows ({run_a.name} vs {run_b.name}): best right "
            f"and runner-up wrong on {b} rows, the opposite on {c}; McNemar exact p = {format_p(p)}: the difference "
            f"is **{verdict}** at {SIGNIFICANCE_LEVEL}.")


def problems_section(table: pd.DataFrame) -> list[str]:
    problems = table[table["status"] != "completed"]
    rows = [[row["run"], row["status"], row["error"] or "-"] for _, row in problems.iterrows()]
    return ["## Failed, killed and incomplete runs", ""] + (markdown_table(["run", "status", "error"], rows) if rows
                                                     else ["None.", ""])


# --- Figures (each returns its report.md lines: an image link, or a note saying why there is none) ------------------

def heatmap_figure(out_dir: Path, table: pd.DataFrame, axes: list[str] | None, names: dict[str, str], metric: str,
                   factors: list[str]) -> list[str]:
    """Every run's cell is drawn; one whose runs all failed reads "no result" instead of vanishing from the axes."""
    ranked = table[(table["status"] == "completed") & table[metric].notna()]
    if axes is None:
        return [(f"No heatmap: it needs two varying parameters besides seed, and {len(factors)} vary "
                 f"({', '.join(factors) or 'none'}); pick two config keys with --axes."), ""]
    if ranked.empty:
        return ["No heatmap: no completed run.", ""]
    grid = figures.heatmap_table(table.assign(**{metric: table[metric].where(table["status"] == "completed")}),
                                 axes[0], axes[1], metric)
    figures.plot_heatmap(out_dir / "heatmap.png", grid, names[axes[0]], names[axes[1]], metric)
    return [f"![{metric} over {names[axes[0]]} × {names[axes[1]]}](heatmap.png)", ""]


def confusion_figure(out_dir: Path, ranked: pd.DataFrame, runs_by_name: dict[str, Run], shown: list[str],
                     names: dict[str, str]) -> list[str]:
    classified = [name for name in ranked["run"] if "confusion_matrix" in runs_by_name[name].summary["results"]["tuned"]]
    best = [runs_by_name[name] for name in classified[:figures.MAX_CONFUSION_PANELS]]
    if not best:  # no completed classification run (Q&A runs have no confusion matrix)
        return []
    panels = [(figures.wrap_title(params.describe(run.config, shown, names) or run.name)
               + f"\naccuracy {run.summary['results']['tuned']['accuracy']:.3f}",
               run.summary["results"]["tuned"]["confusion_matrix"]) for run in best]
    figures.plot_confusion_grid(out_dir / "confusion_matrices.png", panels)
    left_out = len(classified) - len(best)
    note = [f"Confusion matrices of the best {len(best)} runs; {left_out} more left out.", ""] if left_out else []
    return note + ["![tuned confusion matrices](confusion_matrices.png)", ""]


def metric_vs_param_figures(out_dir: Path, ranked: pd.DataFrame, factors: list[str], names: dict[str, str],
                            metric: str) -> list[str]:
    numeric = [key for key in factors if params.is_numeric(ranked[key])]
    if not numeric or ranked.empty:
        return [("No metric-vs-parameter plot: no numeric parameter (such as method.optimizer.lr or "
                 "method.lora.r) varies besides seed."), ""]
    lines = []
    for key in numeric:
        name = f"metric_vs_{key}.png"
        # Only runs with a metric count: a setting that only failed runs had has nothing to plot.
        by_value = figures.metric_by_value(ranked.dropna(subset=[key, metric]), key, metric)
        if by_value.empty:
            lines += [f"No {metric} vs {names[key]} plot: no completed run sets `{key}`.", ""]
            continue
        figures.plot_metric_vs_param(out_dir / name, by_value, key, names[key], metric)
        lines += [f"![{metric} vs {names[key]}]({name})", ""]
    return lines


# --- Console ----------------------------------------------------------------------------------------------------

def print_ranking(ranked: pd.DataFrame, shown: list[str], names: dict[str, str], metric: str,
                  report: Path) -> None:
    companions = companion_metrics(metric)
    table = Table(title=f"Runs ranked by {metric}")
    table.add_column("#", justify="right")
    table.add_column("run", overflow="fold")
    table.add_column("params")  # one wrapping column: a sweep over many keys still fits a terminal
    for column in [metric, *companions]:
        table.add_column(column, justify="right")
    for rank, (_, row) in enumerate(ranked.head(CONSOLE_ROWS).iterrows(), start=1):
        table.add_row(str(rank), row["run"], params.describe(row, shown, names) or "-",
                      format_with_interval(row, metric),
                      *(format_metric(row[name]) for name in companions))
    console = Console()
    console.print(table)
    if len(ranked) > CONSOLE_ROWS:
        console.print(f"... and {len(ranked) - CONSOLE_ROWS} more runs in the report")
    console.print(f"report: {report}", soft_wrap=True)  # one line, whole, for copy and paste
