"""PNG plots of evaluation results (matplotlib, drawn on the Agg canvas: no display and no pyplot state).

- [`plot_roc_curves`]: one panel per class, one ROC curve per model, the AUC in the legend;
- [`plot_confusion_matrix`]: row-normalised confusion matrix with the counts;
- [`plot_precision_at_k`]: Precision@k against k, one line per model / retrieval direction, CI bands;
- [`plot_label_efficiency`]: a metric against the fraction of training labels, one line per model, CI bands;
- [`plot_retrieval_examples`]: a few query images beside the report sentences they retrieved first.

Every function writes one PNG file and returns its path.
"""

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, roc_auc_score, roc_curve

from .metrics import ConfidenceInterval

DPI = 110


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _as_runs(scores) -> dict[str, np.ndarray]:
    if isinstance(scores, Mapping):
        return {name: np.asarray(value, dtype=np.float64) for name, value in scores.items()}
    return {"model": np.asarray(scores, dtype=np.float64)}


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return labels > 0.5 if labels.ndim == 2 else labels[:, None] == np.arange(num_classes)[None, :]


def plot_roc_curves(
    scores, labels, class_names: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> Path:
    """ROC curves, one panel per class (one-vs-rest), one curve per model.

    Args:
        scores: `(N, C)` class scores, or `{model name: (N, C) scores}` to compare models on the same images.
        labels: `(N,)` class ids or `(N, C)` 0/1 rows.
        class_names: the `C` class names (panel titles).
        path: the PNG file to write.
        title: the figure's title, e.g. the task and split.
    """
    runs, labels = _as_runs(scores), np.asarray(labels)
    targets = _one_hot(labels, len(class_names))
    columns = min(len(class_names), 4)
    rows = math.ceil(len(class_names) / columns)
    figure = _figure(3.2 * columns, 3.6 * rows + 0.4)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for column, (axis, name) in enumerate(zip(axes, class_names)):
        positives = int(targets[:, column].sum())
        axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance (0.50)")
        if 0 < positives < len(targets):
            for run_name, run_scores in runs.items():
                fpr, tpr, _ = roc_curve(targets[:, column], run_scores[:, column])
                auc = roc_auc_score(targets[:, column], run_scores[:, column])
                axis.plot(fpr, tpr, label=f"{run_name} ({auc:.2f})")
        else:
            axis.text(0.5, 0.5, "undefined:\nno positives or\nno negatives", ha="center", va="center")
        axis.set_title(f"{name}\n{positives} positive / {len(targets) - positives} negative", fontsize=9)
        axis.set_xlabel("false positive rate")
        axis.set_ylabel("true positive rate")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.01)
        axis.set_aspect("equal")
        axis.legend(loc="lower right", fontsize=7, title="AUC", title_fontsize=7)
    for axis in axes[len(class_names):]:
        axis.set_visible(False)
    figure.suptitle(title or "ROC curves (one-vs-rest)")
    return _save(figure, path)


def plot_confusion_matrix(
    labels, predictions, class_names: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Confusion matrix of single-label predictions: colour = fraction of each true class (rows sum to 1), the cell
    text = that fraction and the image count."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    classes = list(range(len(class_names)))
    counts = confusion_matrix(labels, predictions, labels=classes)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 1.1 * len(class_names)
    figure = _figure(size + 1.2, size)
    axis = figure.subplots()
    display = ConfusionMatrixDisplay(fractions, display_labels=list(class_names))
    display.plot(ax=axis, cmap="Blues", colorbar=True, include_values=False, im_kw={"vmin": 0.0, "vmax": 1.0})
    for row in classes:
        for column in classes:
            dark = fractions[row, column] > 0.55
            axis.text(column, row, f"{fractions[row, column]:.2f}\n({counts[row, column]})", ha="center",
                      va="center", color="white" if dark else "black", fontsize=9)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.tick_params(axis="x", labelrotation=30)
    axis.set_title(title or f"Confusion matrix ({len(labels)} images; rows sum to 1)", fontsize=10)
    return _save(figure, path)


def _value_and_band(points: Mapping) -> tuple[list, list[float], list[float] | None, list[float] | None]:
    """x values, y values and, when the values are [`ConfidenceInterval`]s, the band's bounds."""
    xs = sorted(points)
    values = [points[x] for x in xs]
    if all(isinstance(value, ConfidenceInterval) for value in values):
        return xs, [v.value for v in values], [v.low for v in values], [v.high for v in values]
    return xs, [float(v) for v in values], None, None


def _lines_with_bands(axis, curves: Mapping[str, Mapping]) -> None:
    for name, points in curves.items():
        xs, ys, lows, highs = _value_and_band(points)
        (line,) = axis.plot(xs, ys, marker="o", label=name)
        if lows is not None:
            axis.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)


def _curves_figure(
    curves: Mapping[str, Mapping], path, *, tick_label, xlabel: str, ylabel: str, title: str, chance: float | None,
    chance_label: str, ylim: tuple[float, float] | None = None,
) -> Path:
    """Lines with CI bands over a log x axis whose ticks are the x values, labelled by `tick_label(x)`."""
    figure = _figure(6.0, 4.0)
    axis = figure.subplots()
    _lines_with_bands(axis, curves)
    if chance is not None:
        axis.axhline(chance, linestyle=":", color="grey", label=f"{chance_label} ({chance:.2f})")
    xs = sorted({x for points in curves.values() for x in points})
    axis.set_xscale("log")
    axis.set_xticks(xs, [tick_label(x) for x in xs])
    axis.minorticks_off()
    if ylim is not None:
        axis.set_ylim(*ylim)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    wrapped = "\n".join(textwrap.fill(line, 70) for line in title.splitlines())  # wrapped, not cut off
    axis.set_title(wrapped, fontsize=10)
    return _save(figure, path)


def plot_precision_at_k(
    curves: Mapping[str, Mapping[int, float | ConfidenceInterval]], path: str | os.PathLike,
    title: str | None = None, chance: float | None = None,
) -> Path:
    """Precision@k against k (log scale), one line per curve, e.g. `{"model A, image->text": {1: 0.4, 5: ...}}`;
    values given as [`ConfidenceInterval`]s get a shaded 95% band. `chance`: the precision of a random ranking
    (the fraction of relevant gallery items), drawn as a dotted line."""
    return _curves_figure(
        curves, path, tick_label=str, xlabel="k (items retrieved)", ylabel="Precision@k",
        title=title or "Precision@k: share of the top k sharing the query's label\n(shaded: 95% bootstrap CI)",
        chance=chance, chance_label="random ranking", ylim=(0, 1),
    )  # fmt: skip


def plot_label_efficiency(
    curves: Mapping[str, Mapping[float, float | ConfidenceInterval]], path: str | os.PathLike,
    metric_name: str = "macro AUC", title: str | None = None, chance: float | None = None,
) -> Path:
    """A metric against the fraction of training labels used (log scale, shown in %), one line per model, e.g.
    `{"pretrained": {0.01: ci, 0.1: ci, 1.0: ci}, "random-init": {...}}`; [`ConfidenceInterval`] values get a shaded
    95% band. `chance`: the metric of an uninformed classifier (0.5 for AUC), drawn as a dotted line."""
    return _curves_figure(
        curves, path, tick_label=lambda fraction: f"{100 * fraction:g}%", xlabel="training labels used",
        ylabel=metric_name, title=title or f"Label efficiency: test {metric_name} (shaded: 95% bootstrap CI)",
        chance=chance, chance_label="chance",
    )  # fmt: skip


def _grayscale(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"))
    with Image.open(image) as opened:
        return np.asarray(opened.convert("L"))


def plot_retrieval_examples(
    images: Sequence, query_labels: Sequence[str], retrieved: Sequence[Sequence[tuple[str, str, bool]]],
    path: str | os.PathLike, title: str | None = None, wrap: int = 100,
) -> Path:
    """A grid of query images, each beside the report sentences it retrieved first.

    Args:
        images: the query images (PIL images or file paths).
        query_labels: each query's label, printed under it.
        retrieved: per query, its top sentences as `(sentence, sentence label, relevant)` triples, best first;
            relevant sentences (sharing the query's label) are printed in green with a check mark, others in red.
        path: the PNG file to write.
        title: the figure's title.
        wrap: characters per line of a sentence (at most 3 lines are shown).
    """
    if not len(images) == len(query_labels) == len(retrieved):
        raise ValueError(f"{len(images)} images, {len(query_labels)} labels and {len(retrieved)} result lists differ")
    rows = len(images)
    figure = _figure(9.5, 2.3 * rows + 0.5)
    grid = figure.add_gridspec(rows, 2, width_ratios=[1, 3.3])
    for row, (image, label, sentences) in enumerate(zip(images, query_labels, retrieved)):
        image_axis = figure.add_subplot(grid[row, 0])
        image_axis.imshow(_grayscale(image), cmap="gray")
        image_axis.set_axis_off()
        image_axis.set_title(f"query {row + 1}: {label}", fontsize=9)
        text_axis = figure.add_subplot(grid[row, 1])
        text_axis.set_axis_off()
        y = 0.95
        for rank, (sentence, sentence_label, relevant) in enumerate(sentences, start=1):
            mark, colour = ("\u2713", "darkgreen") if relevant else ("\u2717", "firebrick")
            lines = textwrap.wrap(f"{rank}. {mark} [{sentence_label}] {sentence}", wrap, max_lines=3,
                                  placeholder=" ...") or [""]
            text = text_axis.text(0.0, y, "\n".join(lines), va="top", ha="left", fontsize=8.5, color=colour,
                                  transform=text_axis.transAxes)
            text.set_in_layout(False)  # long texts are cut at 3 lines; they never squeeze the image column
            y -= 0.085 * len(lines) + 0.05
    figure.suptitle(
        title or "Top retrieved report sentences per query image (green \u2713: shares the query's label)", fontsize=10
    )
    return _save(figure, path)


__all__ = [
    "plot_confusion_matrix",
    "plot_label_efficiency",
    "plot_precision_at_k",
    "plot_retrieval_examples",
    "plot_roc_curves",
]
