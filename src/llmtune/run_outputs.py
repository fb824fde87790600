"""What one run leaves in its folder: metrics.json, predictions.jsonl, prompt.json, report.md, plots, the console table
(the cross-run report is llmtune.report)."""

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from llmtune.data.splits import SMALL_TEST_CLASS
from llmtune.files import write_atomic, write_atomic_with

RETRIEVAL_EXAMPLES = 3  # rag=true: test rows shown in report.md with what was retrieved for them


def write_run(run_dir: Path, summary: dict, predictions: dict, test_rows: list[dict], prompt_format, task) -> None:
    """Everything a finished run leaves: prompt.json (predict, serve and export prompt exactly as the run did),
    predictions.jsonl, the task's figures, metrics.json, report.md, and the console table."""
    prompt_format.save(run_dir)
    records = write_predictions(run_dir, predictions["tuned"], predictions.get("base"), test_rows)
    tuned_name = method_label(summary["run"])
    figures = task.figures(run_dir, summary["results"], tuned_name)
    write_metrics(run_dir, summary)
    write_report(run_dir, summary, figures, records, task.report_metrics,
                 task.report_detail(summary["results"], records, tuned_name))
    print_run_table(summary, run_dir, task.report_metrics)


def write_metrics(run_dir: Path, summary: dict) -> None:
    write_atomic(run_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")


def write_predictions(run_dir: Path, tuned: list[dict], base: list[dict] | None, rows: list[dict]) -> list[dict]:
    """One line per test row: the tuned prediction (and label probabilities), the base model's when scored, and with
    rag=true what was retrieved for the row."""
    records = []
    for index, prediction in enumerate(tuned):
        record = dict(prediction)
        if base is not None:
            record["base_predicted"] = base[index]["predicted"]
            if "scores" in base[index]:
                record["base_scores"] = base[index]["scores"]
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


def comparison_rows(results: dict, metrics: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(metric, base, tuned) rows with 3 decimals; '-' where the base model was not scored (or a metric is None)."""
    def cell(name, key):
        value = results.get(name, {}).get(key)
        return "-" if value is None else f"{value:.3f}"
    return [(key, cell("base", key), cell("tuned", key)) for key in metrics]


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
    if "val" in results:
        shown = metrics[:2]
        lines += ["", f"Validation ({tuned_name}, n={results['val']['n']}): "
                  + ", ".join(f"{key} {results['val'][key]:.3f}" for key in shown) + "."]
    lines += detail
    if summary.get("retrieval"):
        lines += _retrieval_section(summary["retrieval"], records)
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()), ""]
    lines += [f"![{name}]({name})" for name in figures]
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")


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


def answer_examples(records: list[dict], tuned_name: str) -> list[str]:
    lines = ["", f"Example answers (first {RETRIEVAL_EXAMPLES} test rows):", ""]
    for record in records[:RETRIEVAL_EXAMPLES]:
        lines += [f"- **Q:** {record['text']}", f"  - reference: {record['gold']}",
                  f"  - {tuned_name}: {record['predicted']}"]
        if "base_predicted" in record:
            lines.append(f"  - base: {record['base_predicted']}")
    return lines


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
    console.print(f"run directory: {run_dir}  (total {summary['timing_s']['total']:.0f} s)")
