"""Classification metrics from a confusion matrix: accuracy, UAR, WAR, macro-F1, per class.

Everything is computed from one integer confusion matrix C [num_classes, num_classes] whose rows
are true classes and columns predicted classes, so the numbers in `eval` and in the confusion
matrix it prints can never disagree. For class c:

- support N_c = row sum (how often c is the true label), predicted P_c = column sum, TP_c = C[c, c];
- recall_c = TP_c / N_c; precision_c = TP_c / P_c, taken as 0 when c is never predicted;
- F1_c = 2·TP_c / (N_c + P_c), the harmonic mean of precision and recall, which is 0 (not NaN,
  no warning) when c is never predicted or never predicted correctly.

Averages are over the classes *present in the labels* (N_c > 0): a class with no true samples has
no recall (0 / 0), so it can neither help nor hurt UAR or macro-F1.

- accuracy = Σ_c TP_c / N;
- UAR (unweighted average recall, macro recall) = mean of recall_c over present classes;
- WAR (weighted average recall) = Σ_c (N_c / N) · recall_c, which equals accuracy;
- macro-F1 = mean of F1_c over present classes.

`per_class_recall` and `per_class_f1` hold exactly the present classes, so UAR is the mean of
`per_class_recall` and macro-F1 the mean of `per_class_f1`; the confusion matrix shows all classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmkit.errors import MmkitError


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """int64 [num_classes, num_classes]: entry [t, p] counts samples of true class t predicted as p."""
    if labels.dim() != 1 or predictions.dim() != 1 or labels.shape != predictions.shape:
        raise MmkitError(
            f"labels and predictions must be 1-D and of equal length; got shapes "
            f"{tuple(labels.shape)} and {tuple(predictions.shape)}"
        )
    if num_classes < 1:
        raise MmkitError(f"num_classes must be at least 1, got {num_classes}")
    labels = labels.detach().to("cpu", torch.int64)
    predictions = predictions.detach().to("cpu", torch.int64)
    for what, values in (("label", labels), ("prediction", predictions)):
        outside = (values < 0) | (values >= num_classes)
        if bool(outside.any()):
            bad = int(values[outside][0])
            raise MmkitError(f"{what} {bad} is outside 0..{num_classes - 1} for {num_classes} classes")
    # One bin per (true, predicted) pair, row-major: index = t * C + p.
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@dataclass(frozen=True)
class ClassificationMetrics:
    """Metrics of one split; see the module docstring for the conventions."""

    n: int
    accuracy: float
    uar: float
    war: float
    macro_f1: float
    per_class_recall: dict[str, float]  # classes present in the labels only
    per_class_f1: dict[str, float]  # classes present in the labels only
    confusion: list[list[int]]  # rows = true class, columns = predicted class, in `classes` order
    classes: tuple[str, ...]  # the order of the confusion matrix's rows and columns

    def as_dict(self, split: str) -> dict[str, Any]:
        """The `mmkit eval --json` document (a stable contract)."""
        return {
            "split": split,
            "n": self.n,
            "accuracy": self.accuracy,
            "uar": self.uar,
            "war": self.war,
            "macro_f1": self.macro_f1,
            "per_class_recall": dict(self.per_class_recall),
            "per_class_f1": dict(self.per_class_f1),
            "classes": list(self.classes),
            "confusion_matrix": [list(row) for row in self.confusion],
        }


def classification_metrics(confusion: Tensor, classes: Sequence[str]) -> ClassificationMetrics:
    """All metrics from a confusion matrix (rows = true, columns = predicted) and the class names."""
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise MmkitError(f"confusion matrix must be square [C, C], got shape {tuple(confusion.shape)}")
    num_classes = confusion.shape[0]
    if len(classes) != num_classes:
        raise MmkitError(f"{len(classes)} class names for a {num_classes}-class confusion matrix")
    matrix: list[list[int]] = [[int(v) for v in row] for row in confusion.detach().to("cpu").tolist()]
    if any(v < 0 for row in matrix for v in row):
        raise MmkitError("confusion matrix has negative counts")
    n = sum(sum(row) for row in matrix)
    if n == 0:
        raise MmkitError("no samples to evaluate (n = 0): the split is empty")

    support = [sum(row) for row in matrix]  # N_c, true samples per class
    predicted = [sum(matrix[t][p] for t in range(num_classes)) for p in range(num_classes)]  # P_c
    true_positives = [matrix[c][c] for c in range(num_classes)]
    present = [c for c in range(num_classes) if support[c] > 0]

    recall = {c: true_positives[c] / support[c] for c in present}
    # 2·TP / (N_c + P_c) == 2PR / (P + R); the denominator is > 0 because N_c > 0.
    f1 = {c: 2 * true_positives[c] / (support[c] + predicted[c]) for c in present}

    return ClassificationMetrics(
        n=n,
        accuracy=sum(true_positives) / n,
        uar=math.fsum(recall.values()) / len(present),
        war=math.fsum(support[c] / n * recall[c] for c in present),
        macro_f1=math.fsum(f1.values()) / len(present),
        per_class_recall={classes[c]: recall[c] for c in present},
        per_class_f1={classes[c]: f1[c] for c in present},
        confusion=matrix,
        classes=tuple(classes),
    )
