"""Scores of a model on labelled data, and the report files that show them."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

__all__ = ["classification_scores", "format_scores", "write_report"]

logger = logging.getLogger(__name__)


def classification_scores(y_true, y_pred, classes=None) -> dict:
    """Accuracy, balanced accuracy, macro F1, per-class scores, confusion matrix.

    Parameters
    ----------
    y_true, y_pred : array-like of labels
    classes : sequence, optional
        The model's classes, listed first in the per-class table and the
        matrix; labels seen only in ``y_true`` follow.

    Returns
    -------
    dict
        ``n_samples``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
        ``per_class`` (label -> precision, recall, f1, support) and
        ``confusion_matrix`` (``labels``, and ``matrix`` with true labels in
        rows).

    Examples
    --------
    >>> scores = classification_scores(["a", "a", "b"], ["a", "b", "b"])
    >>> scores["accuracy"], scores["per_class"]["b"]["support"]
    (0.6667, 1)
    """
    y_true = np.asarray(y_true, dtype=object)
    y_pred = np.asarray(y_pred, dtype=object)
    labels = [str(label) for label in (classes if classes is not None else [])]
    for label in sorted({str(label) for label in y_true} - set(labels)):
        labels.append(label)
    y_true = y_true.astype(str)
    y_pred = y_pred.astype(str)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    present = [label for label in labels if label in set(y_true)]
    return {
        "n_samples": int(len(y_true)),
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "balanced_accuracy": round(float(balanced_accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(
            float(
                f1_score(
                    y_true, y_pred, labels=present, average="macro", zero_division=0
                )
            ),
            4,
        ),
        "per_class": {
            label: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {
            "labels": labels,
            "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        },
    }


def format_scores(scores: dict) -> str:
    """The scores as a short text report: headline, per-class table, matrix."""
    lines = [
        f"{scores['n_samples']} samples: accuracy {scores['accuracy']:.4f}, "
        f"balanced accuracy {scores['balanced_accuracy']:.4f}, "
        f"macro F1 {scores['macro_f1']:.4f}",
        "",
    ]
    width = max(8, *(len(label) for label in scores["per_class"]))
    lines.append(
        f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"
    )
    for label, row in scores["per_class"].items():
        lines.append(
            f"{label:<{width}} {row['precision']:>9.4f} {row['recall']:>7.4f} "
            f"{row['f1']:>7.4f} {row['support']:>8d}"
        )
    labels = scores["confusion_matrix"]["labels"]
    matrix = scores["confusion_matrix"]["matrix"]
    cell = max(5, *(len(label) for label in labels))
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    lines.append(" " * width + " " + " ".join(f"{label:>{cell}}" for label in labels))
    for label, row in zip(labels, matrix, strict=True):
        lines.append(
            f"{label:<{width}} " + " ".join(f"{count:>{cell}d}" for count in row)
        )
    return "\n".join(lines)


def write_report(
    scores: dict, folder: str | os.PathLike, search: list[dict] | None = None
) -> list[Path]:
    """Write the report files into ``folder``; returns their paths.

    Files: ``scores.json``, ``per_class.csv``, ``confusion_matrix.png`` and,
    when ``search`` holds grid-search results, ``cv_scores.png`` (the
    cross-validated score of each candidate).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "scores.json", folder / "per_class.csv"]
    written[0].write_text(json.dumps(scores, indent=2) + "\n")
    with open(written[1], "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["label", "precision", "recall", "f1", "support"])
        for label, row in scores["per_class"].items():
            writer.writerow(
                [label, row["precision"], row["recall"], row["f1"], row["support"]]
            )
    written.append(_plot_confusion(scores, folder / "confusion_matrix.png"))
    if search:
        written.append(_plot_search(search, folder / "cv_scores.png"))
    logger.info("wrote report to %s", folder)
    return written


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_confusion(scores: dict, path: Path) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    labels = scores["confusion_matrix"]["labels"]
    matrix = np.array(scores["confusion_matrix"]["matrix"])
    side = max(4.0, 0.6 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay(matrix, display_labels=labels).plot(
        ax=axes, colorbar=False, xticks_rotation=45 if len(labels) > 4 else 0
    )
    axes.set_title(
        f"accuracy {scores['accuracy']:.3f}, macro F1 {scores['macro_f1']:.3f}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _plot_search(search: list[dict], path: Path) -> Path:
    plt = _pyplot()
    rows = sorted(search, key=lambda row: row["C"])
    values = [row["C"] for row in rows]
    means = np.array([row["mean_score"] for row in rows])
    stds = np.array([row["std_score"] for row in rows])
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.errorbar(values, means, yerr=stds, marker="o", capsize=3)
    axes.set_xscale("log")
    axes.set_xlabel("C")
    axes.set_ylabel("cross-validated accuracy")
    best = max(rows, key=lambda row: row["mean_score"])
    axes.set_title(f"grid search: best C={best['C']:g} ({best['mean_score']:.3f})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
