"""The cross-run figures: metric heatmap over two parameters, confusion-matrix grid, metric against a parameter."""

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window (and no display on a server)
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter
from sklearn.metrics import ConfusionMatrixDisplay

from llmtune.files import write_atomic_with
from llmtune.report.params import format_value, is_numeric

MAX_CONFUSION_PANELS = 12


def save_png(figure, path: Path) -> None:
    """Save under a temporary name, then rename: a crash never leaves a half-written image under the real name."""
    try:
        write_atomic_with(path, lambda partial: figure.savefig(partial, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(figure)


def ordered_levels(values: pd.Series) -> pd.Categorical:
    """Parameter values as labels, in numeric order for numbers (1e-05 before 0.0001) and text order otherwise."""
    present = values.dropna().unique().tolist()
    present.sort(key=float if is_numeric(values) else str)
    levels = list(dict.fromkeys([format_value(value) for value in present] + ["-"] * bool(values.isna().any())))
    return pd.Categorical(values.map(format_value), categories=levels, ordered=True)


def heatmap_table(table: pd.DataFrame, row_key: str, column_key: str, metric: str) -> pd.DataFrame:
    """The metric's mean for each (row value, column value) pair, over every other parameter and seed; NaN where
    no run of that pair produced the metric (the pair still gets its row and column, e.g. when all its jobs failed)."""
    cells = pd.DataFrame({"row": ordered_levels(table[row_key]), "column": ordered_levels(table[column_key]),
                          "value": table[metric].to_numpy()})
    return cells.pivot_table(index="row", columns="column", values="value", aggfunc="mean", observed=False,
                             dropna=False)


def plot_heatmap(path: Path, grid: pd.DataFrame, row_label: str, column_label: str, metric: str) -> None:
    values = grid.to_numpy(dtype=float)
    figure, axis = plt.subplots(figsize=(max(4.5, 1.3 * values.shape[1] + 2.5), max(3.0, 0.7 * values.shape[0] + 1.8)))
    image = axis.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    low, high = np.nanmin(values), np.nanmax(values)
    for (row, column), value in np.ndenumerate(values):
        # Dark text on the bright (high) end of viridis and on empty (white) cells, white text on the dark end.
        dark_text = math.isnan(value) or (high > low and (value - low) / (high - low) > 0.6)
        axis.text(column, row, "no result" if math.isnan(value) else f"{value:.3f}", ha="center", va="center",
                  color="black" if dark_text else "white", fontsize=11)
    axis.set_xticks(range(values.shape[1]), [str(label) for label in grid.columns],
                    rotation=30 if max(map(len, map(str, grid.columns))) > 8 else 0, ha="right")
    axis.set_yticks(range(values.shape[0]), [str(label) for label in grid.index])
    axis.set_xlabel(column_label)
    axis.set_ylabel(row_label)
    axis.set_title(f"{metric}\n(mean over the other parameters and seeds)", fontsize=10)
    figure.colorbar(image, ax=axis, label=metric)
    save_png(figure, path)


def plot_confusion_grid(path: Path, panels: list[tuple[str, dict]]) -> None:
    """One tuned confusion matrix per (title, {"labels", "matrix"}) panel, four to a row."""
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    # constrained layout leaves room for the suptitle and the multi-line panel titles (tight_layout does not).
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.4 * rows), squeeze=False,
                                layout="constrained")
    for axis, (title, matrix) in zip(axes.flat, panels):
        labels = matrix["labels"]
        ConfusionMatrixDisplay(np.array(matrix["matrix"]), display_labels=labels).plot(
            ax=axis, colorbar=False, cmap="Blues", xticks_rotation=45 if len(labels) > 3 else "horizontal")
        axis.set_title(title, fontsize=9)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    figure.suptitle("Tuned model confusion matrices (rows gold, columns predicted), best first")
    save_png(figure, path)


def wrap_title(text: str, width: int = 42) -> str:
    return "\n".join(textwrap.wrap(text, width)) or " "


def metric_by_value(table: pd.DataFrame, key: str, metric: str) -> pd.DataFrame:
    """mean, sample std (ddof=1; NaN for one run) and n of the metric for each value of one numeric parameter."""
    return table.groupby(key)[metric].agg(["mean", "std", "count"]).sort_index()


def plot_metric_vs_param(path: Path, by_value: pd.DataFrame, key: str, label: str, metric: str) -> None:
    x = by_value.index.to_numpy(dtype=float)
    figure, axis = plt.subplots(figsize=(6.0, 4.0))
    axis.errorbar(x, by_value["mean"], yerr=by_value["std"].fillna(0.0), fmt="o-", capsize=4)
    # Learning rates and ranks are tried on a multiplicative grid: equal ratios should look equally far apart.
    if x.min() > 0 and x.max() / x.min() > 3:
        axis.set_xscale("log")
    # Sampled values (random/Bayesian sweeps) can fall close together: slanted one-line labels do not overlap, and
    # the run count moves to the axis title when every point has the same.
    counts = by_value["count"].tolist()
    same_count = len(set(counts)) == 1
    labels = [format_value(float(value)) + ("" if same_count else f" (n={n})") for value, n in zip(x, counts)]
    axis.set_xticks(x, labels, **({"rotation": 30, "ha": "right"} if len(x) > 3 else {}))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel(f"{key} (n={counts[0]} per point)" if same_count else key)
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} vs {label}: mean ± std over the other parameters and seeds", fontsize=10)
    axis.grid(alpha=0.3)
    save_png(figure, path)
