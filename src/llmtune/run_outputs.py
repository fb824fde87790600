"""What one run leaves in its folder: metrics.json, predictions.jsonl, prompt.json, report.md, plots, the console table
(the cross-run report is llmtune.report)."""

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from llmtune.data.splits import SMALL_TEST_CLASS
from llmtune.evaluation import judge
from llmtune.files import write_atomic, write_atomic_with

RETRIEVAL_EXAMPLES = 3  # rag=true: test rows shown in report.md with what was retrieved for them
INTERVALS_NOTE = "In brackets: the 95% bootstrap interval (1,000 seeded resamples of the test rows)."


def write_run(run_dir: Path, summary: dict, predictions: dict, test_rows: list[dict], prompt_format, task) -> None:
    """Everything a finished run leaves: prompt.json (predict, serve and export prompt exactly as the run did),
    predictions.jsonl, the task's figures, metrics.json, report.md, and the console table. With an LLM judge
    (eval.judge), metrics.json also gets `judge`: its tally and how often it disagrees with ROUGE-L on base vs tuned."""
    prompt_format.save(run_dir)
    records = write_predictions(run_dir, predictions["tuned"], predictions.get("base"), test_rows)
    judged = judge.run_summary(summary["results"], records)
    if judged:
        summary["judge"] = judged
    tuned_name = method_label(summary["run"])
    figures = task.figures(run_dir, summary["results"], tuned_name)
    write_metrics(run_dir, summary)
    write_report(run_dir, summary, figures, records, task.report_metrics,
                 task.report_detail(summary["results"], records, tuned_name))
    print_run_table(summary, run_dir, task.report_metrics)


def write_metrics(run_dir: Path, summary: dict) -> None:
    write_atomic(run_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")


def write_predictions(run_dir: Path, tuned: list[dict], base: list[dict] | None, rows: list[dict]) -> list[dict]:
    """One line per test row: the tuned prediction (and label probabilities, or the judge's verdict), the base
    model's when scored, and with rag=true what was retrieved for the row."""
    records = []
    for index, prediction in enumerate(tuned):
        record = dict(prediction)
        if base is not None:
            record["base_predicted"] = base[index]["predicted"]
            for key in ("scores", "judge"):
                if key in base[index]:
                    record[f"base_{key}"] = base[index][key]
        if "retrieved" in rows[index]:
            record["retrieved"] = rows[index]["retrieved"]
        records.append(record)
    write_atomic(run_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def plot_confusion(run_dir: Path, results: dict, tuned_name: str = "tuned") -> list[str]:
    """One PNG with a confusion matrix per evaluated model (base, tuned), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    names = [n for n in ("base", "tuned") if n in results]
    figure, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        matrix = results[name]["confusion_matrix"]
        ConfusionMatrixDisplay(np.array(matrix["matrix"]), display_labels=matrix["labels"]).plot(
            ax=axis, colorbar=False, cmap="Blues")
        axis.set_title(f"{tuned_name if name == 'tuned' else name}: accuracy {results[name]['accuracy']:.3f}")
    figure.tight_layout()
    write_atomic_with(run_dir / "confusion_matrix.png", lambda path: figure.savefig(path, format="png", dpi=110))
    plt.close(figure)
    return ["confusion_matrix.png"]


def plot_reliability(run_dir: Path, results: dict, tuned_name: str = "tuned") -> list[str]:
    """reliability.png: accuracy against mean confidence per confidence bin (the diagonal is perfect calibration) for
    the base model, the tuned one before temperature scaling and after; empty where no confidences were scored."""
    tuned = results.get("tuned", {})
    curves = [(f"{name} (ECE {metrics['ece']:.3f})", metrics["reliability"]) for name, metrics in (
        ("base", results.get("base")), (f"{tuned_name}, before scaling", tuned.get("before_scaling")),
        (f"{tuned_name}, temperature-scaled", tuned)) if metrics and metrics.get("reliability")]
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.2, 4.6))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for label, bins in curves:
        axis.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=label)
    axis.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence (mean of the bin)", ylabel="accuracy in the bin",
             title="Reliability on the test rows (15 confidence bins)")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    write_atomic_with(run_dir / "reliability.png", lambda path: figure.savefig(path, format="png", dpi=110))
    plt.close(figure)
    return ["reliability.png"]


def comparison_rows(results: dict, metrics: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(metric, base, tuned) rows with 3 decimals and the 95% bootstrap interval; '-' where the base model was not
    scored (or a metric is None). A metric that no model has (the judge's, when it was off or failed) is no row."""
    def cell(name, key):
        value = (results.get(name) or {}).get(key)
        interval = (results.get(name) or {}).get("intervals", {}).get(key)
        if value is None:
            return "-"
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"
    shown = [key for key in metrics if any(key in (results.get(name) or {}) for name in ("base", "tuned"))]
    return [(key, cell("base", key), cell("tuned", key)) for key in shown]


def calibration_line(summary: dict) -> list[str]:
    """The report's calibration figures: ECE and Brier of the tuned confidences before and after temperature scaling
    (and the base model's), with the fitted temperature."""
    tuned, base, fitted = summary["results"].get("tuned", {}), summary["results"].get("base") or {}, summary.get(
        "calibration")
    if "ece" not in tuned:
        return []
    before = tuned.get("before_scaling", tuned)
    line = f"Calibration on test ({method_label(summary['run'])}): ECE {before['ece']:.3f}, Brier {before['brier']:.3f}"
    if fitted:
        line += (f"; after temperature scaling (T = {fitted['temperature']:.3g}, fitted on {fitted['val_n']} "
                 f"validation rows: NLL {fitted['val_nll']['before']:.3f} -> {fitted['val_nll']['after']:.3f}) "
                 f"ECE {tuned['ece']:.3f}, Brier {tuned['brier']:.3f}")
    else:
        line += " (no validation rows: no temperature fitted)"
    if "ece" in base:
        line += f". Base model: ECE {base['ece']:.3f}, Brier {base['brier']:.3f}"
    return ["", line + "."]


def method_label(run: dict) -> str:
    """What the 'tuned' results are: the fine-tuned model, or for a prompting baseline (zeroshot, fewshot) its name."""
    return "tuned" if run.get("trained", True) else run["method"]


def write_report(run_dir: Path, summary: dict, figures: list[str], records: list[dict], metrics: tuple[str, ...],
                 detail: list[str]) -> None:
    """report.md: the setup, base vs tuned on `metrics`, validation, the task's detail (per-label figures, example
    answers), the retrieval settings and examples (rag=true), wall times and the figures."""
    run, results, timing, train = summary["run"], summary["results"], summary["timing_s"], summary["train"]
    tuned_name = method_label(run)
    setup = f"Train {run['n_train']} / val {run['n_val']} / test {run['n_test']} rows (seed {run['seed']}); "
    if run.get("lora"):
        setup += f"LoRA r={run['lora']['r']} alpha={run['lora']['lora_alpha']} on {run['lora']['target_modules']}; "
    elif run.get("trained", True):
        setup += "every weight fine-tuned (no LoRA); "
    if run.get("trained", True):
        setup += f"{train['epochs']} epoch(s), {train['steps']} steps, {train['tokens_per_s']:.0f} train tokens/s."
        if train.get("resumed_from_step") is not None:
            setup += f" Resumed from the checkpoint at step {train['resumed_from_step']} after an interruption."
    else:
        setup += f"no training ({run['method']}: the base model, prompted)."
    lines = [f"# {run['model']} · {run['method']} · rag={run['rag']} · {run['dataset']}", "", setup, "",
             *([_data_line(summary["data"]), ""] if summary.get("data") else []),
             f"| metric | base | {tuned_name} |", "|---|---|---|"]
    lines += [f"| {m} | {b} | {t} |" for m, b, t in comparison_rows(results, metrics)]
    lines += ["", INTERVALS_NOTE] if results.get("tuned", {}).get("intervals") else []
    lines += calibration_line(summary)
    if train.get("selection"):
        lines += ["", _selection_line(train)]
    if "val" in results:
        shown = metrics[:2]
        lines += ["", f"Validation ({tuned_name}, n={results['val']['n']}): "
                  + ", ".join(f"{key} {results['val'][key]:.3f}" for key in shown) + "."]
    lines += detail
    lines += judge.report_lines(summary, tuned_name)
    if summary.get("retrieval"):
        lines += _retrieval_section(summary["retrieval"], records)
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()), ""]
    lines += [f"![{name}]({name})" for name in figures]
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")


def _selection_line(train: dict) -> str:
    selection, metric = train["selection"], next((k for k in train["selection"] if k.startswith("best_val_")), None)
    stopped = {"max_time": "at the trainer.max_time budget", "early_stopping": "early (no better validation score)",
               "limit": "at the epoch/step limit"}.get(train.get("stopped_by"), "")
    line = f"Training stopped {stopped}. " if stopped else ""
    if metric is None:
        return line + f"Weights: the last ones ({selection.get('why') or 'select=last'})."
    chosen = "restored" if selection["select"] == "best" else "seen (select=last keeps the final weights)"
    return line + (f"Best validation {metric.removeprefix('best_val_')} {selection[metric]:.3f} at step "
                   f"{selection['best_step']}: {chosen}.")


def _data_line(counts: dict) -> str:
    """What was read, dropped, how the split was made (with each part's classes), overlap with test and cut texts."""
    read = []
    if "rows_read" in counts:
        read.append(f"{counts['rows_read']} rows read, {counts['empty_text']} without text (skipped)")
    if "duplicates_removed" in counts:
        read.append(f"{counts['duplicates_removed']} repeated texts dropped "
                    f"({counts['conflicting_answers']} of them with conflicting answers)")
    line = f"Data: {', '.join(read)}." if read else "Data:"
    if counts.get("split_mode"):
        line += f" Split: {counts['split_mode']}"
        if counts.get("class_counts"):
            line += "; " + " / ".join(f"{part} " + ", ".join(f"{label} {n}" for label, n in classes.items())
                                      for part, classes in counts["class_counts"].items())
        line += "."
    if counts.get("overlap_with_test"):
        line += " Texts also in the test split: " + ", ".join(
            f"{part} {n}" for part, n in counts["overlap_with_test"].items()) + " rows."
    cut = counts.get("truncated")
    if cut:
        line += (f" Texts cut to {cut['max_input_tokens']} tokens ({cut['side']}): train {cut.get('train', 0)}, "
                 f"val {cut.get('val', 0)}, test {cut.get('test', 0)} rows.")
    small = {label: n for label, n in (counts.get("class_counts") or {}).get("test", {}).items()
             if n < SMALL_TEST_CLASS}
    if small:
        line += (f"\n\n**Warning:** test classes with fewer than {SMALL_TEST_CLASS} rows ("
                 + ", ".join(f"{label} {n}" for label, n in small.items())
                 + "): their per-label figures are noisy.")
    return line


def classification_detail(tuned: dict, tuned_name: str) -> list[str]:
    lines = ["", f"Per label ({tuned_name}):", "", "| label | precision | recall | f1 | support |",
             "|---|---|---|---|---|"]
    lines += [f"| {label} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
              for label, v in tuned["per_label"].items()]
    matrix = tuned["confusion_matrix"]
    lines += ["", f"Confusion matrix ({tuned_name}; rows gold, columns predicted):", "",
              "| gold \\ predicted | " + " | ".join(matrix["labels"]) + " |",
              "|---|" + "---|" * len(matrix["labels"])]
    lines += [f"| {label} | " + " | ".join(map(str, row)) + " |"
              for label, row in zip(matrix["labels"], matrix["matrix"])]
    return lines


def slice_detail(results: dict, column: str | None, task, tuned_name: str) -> list[str]:
    """The test metrics per value of dataset.slice_column, base beside tuned; nothing without that setting."""
    tuned = results["tuned"].get("slices")
    if not tuned:
        return []
    base = (results.get("base") or {}).get("slices") or {}
    headline, second = task.headline, task.slice_metric
    lines = ["", f"By {column} (dataset.slice_column; 95% intervals in brackets):", "",
             f"| {column} | rows | base {headline} | {tuned_name} {headline} | {tuned_name} {second} |",
             "|---|---|---|---|---|"]
    for value, scores in tuned.items():
        before = f"{base[value][headline]:.3f}" if value in base else "-"
        low, high = scores["intervals"].get(headline, [scores[headline]] * 2)
        lines.append(f"| {value} | {scores['n']} | {before} | {scores[headline]:.3f} [{low:.3f}, {high:.3f}] | "
                     f"{scores[second]:.3f} |")
    return lines


def answer_examples(records: list[dict], tuned_name: str) -> list[str]:
    lines = ["", f"Example answers (first {RETRIEVAL_EXAMPLES} test rows):", ""]
    for record in records[:RETRIEVAL_EXAMPLES]:
        lines += [f"- **Q:** {record['text']}", f"  - reference: {record['gold']}",
                  f"  - {tuned_name}: {record['predicted']}{_verdict_note(record.get('judge'))}"]
        if "base_predicted" in record:
            lines.append(f"  - base: {record['base_predicted']}{_verdict_note(record.get('base_judge'))}")
    return lines


def _verdict_note(verdict: dict | None) -> str:
    """The judge's grades of an example answer, as report.md shows them after it."""
    if not verdict:
        return ""
    if "invalid" in verdict:
        return " *(judge: no valid reply)*"
    return (f" *(judge: correctness {verdict['correctness']}, relevance {verdict['relevance']}: "
            f"{verdict['reason']})*")


def _retrieval_section(retrieval: dict, records: list[dict]) -> list[str]:
    """Settings and recall, then a few test rows with what was retrieved for them (text cut to 300 characters)."""
    settings = ", ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in retrieval.items())
    lines = ["", "## Retrieval", "", settings + ".", ""]
    for record in records[:RETRIEVAL_EXAMPLES]:
        lines.append(f"- **{record['text'][:200]}** -> gold {record['gold']!s:.200}, predicted {record['predicted']!s:.200}")
        for hit in record.get("retrieved", []):
            where = (f"{hit['source']} p.{hit['page']}: {hit['text'][:300]}" if "source" in hit
                     else f"example {hit['id']} ({hit['label']}): {hit['text'][:300]}")
            lines.append(f"  - {where}".replace("\n", " "))
    return lines


def print_run_table(summary: dict, run_dir: Path, metrics: tuple[str, ...]) -> None:
    table = Table(title=f"{summary['run']['model']} · {summary['run']['method']} · {summary['run']['dataset']} "
                        f"(test n={summary['run']['n_test']})")
    for column in ("metric", "base", method_label(summary["run"])):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in comparison_rows(summary["results"], metrics):
        table.add_row(*row)
    console = Console(soft_wrap=True)  # the run directory on one line, also in a log file
    console.print(table)
    if summary["results"].get("tuned", {}).get("intervals"):
        console.print(INTERVALS_NOTE)
    console.print(f"run directory: {run_dir}  (total {summary['timing_s']['total']:.0f} s)")
