"""Metrics against confusion matrices worked out by hand."""

from __future__ import annotations

import json

import pytest
import torch

from mmkit.errors import MmkitError
from mmkit.train.metrics import classification_metrics, confusion_matrix

CLASSES = ["cat", "dog", "fox"]

# Rows = true, columns = predicted. 10 samples, imbalanced (6 / 3 / 1); "fox" is never predicted.
#            cat dog fox
HAND = [
    [4, 2, 0],  # true cat: N = 6, TP = 4
    [1, 2, 0],  # true dog: N = 3, TP = 2
    [1, 0, 0],  # true fox: N = 1, TP = 0
]
# Column sums (predicted): cat 6, dog 4, fox 0.
# recall:   cat 4/6 = 2/3, dog 2/3, fox 0/1 = 0
# accuracy: (4 + 2 + 0) / 10 = 0.6 ; WAR = 6/10·2/3 + 3/10·2/3 + 1/10·0 = 0.6
# UAR:      (2/3 + 2/3 + 0) / 3 = 4/9
# F1 = 2TP / (N + P): cat 8/12 = 2/3, dog 4/7, fox 0/1 = 0 ; macro-F1 = (2/3 + 4/7 + 0) / 3 = 26/63


def _hand_labels_and_predictions() -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [(t, p) for t, row in enumerate(HAND) for p, count in enumerate(row) for _ in range(count)]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))  # order must not matter
    labels = torch.tensor([pairs[i][0] for i in order])
    predictions = torch.tensor([pairs[i][1] for i in order])
    return labels, predictions


def test_confusion_matrix_from_tensors_equals_the_hand_built_one() -> None:
    labels, predictions = _hand_labels_and_predictions()
    matrix = confusion_matrix(labels, predictions, num_classes=3)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == HAND


def test_confusion_matrix_keeps_rows_for_classes_that_never_occur() -> None:
    matrix = confusion_matrix(torch.tensor([0, 0, 2]), torch.tensor([0, 2, 2]), num_classes=4)
    assert matrix.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_three_class_imbalanced_case_by_hand() -> None:
    m = classification_metrics(torch.tensor(HAND), CLASSES)
    assert m.n == 10
    assert m.accuracy == pytest.approx(0.6)
    assert m.war == pytest.approx(0.6)
    assert m.uar == pytest.approx(4 / 9)
    assert m.uar != pytest.approx(m.war)  # imbalanced: macro and weighted recall differ
    assert m.per_class_recall == pytest.approx({"cat": 2 / 3, "dog": 2 / 3, "fox": 0.0})
    assert m.per_class_f1 == pytest.approx({"cat": 2 / 3, "dog": 4 / 7, "fox": 0.0})
    assert m.macro_f1 == pytest.approx(26 / 63)
    assert m.confusion == HAND


def test_war_equals_accuracy() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (997,), generator=generator)
    predictions = torch.where(torch.rand(997, generator=generator) < 0.6, labels, torch.randint(0, 5, (997,)))
    m = classification_metrics(confusion_matrix(labels, predictions, 5), list("abcde"))
    assert m.accuracy == pytest.approx((labels == predictions).float().mean().item())
    assert m.war == pytest.approx(m.accuracy, abs=1e-12)


def test_never_predicted_class_has_f1_zero_without_nan_or_warning(recwarn: pytest.WarningsRecorder) -> None:
    m = classification_metrics(torch.tensor(HAND), CLASSES)
    assert m.per_class_f1["fox"] == 0.0
    assert all(v == v for v in [m.uar, m.war, m.macro_f1, *m.per_class_f1.values()])  # no NaN
    assert len(recwarn) == 0


def test_class_absent_from_labels_is_left_out_of_the_averages() -> None:
    # "owl" is predicted once but never the true label: its recall is 0/0, undefined.
    #            cat dog owl
    matrix = [
        [2, 0, 0],  # true cat: N = 2, TP = 2 -> recall 1,   F1 = 4 / (2 + 2) = 1
        [0, 1, 1],  # true dog: N = 2, TP = 1 -> recall 1/2, F1 = 2 / (2 + 1) = 2/3
        [0, 0, 0],  # true owl: N = 0
    ]
    m = classification_metrics(torch.tensor(matrix), ["cat", "dog", "owl"])
    assert m.n == 4
    assert m.accuracy == pytest.approx(3 / 4)
    assert m.war == pytest.approx(3 / 4)
    assert m.uar == pytest.approx((1 + 1 / 2) / 2)  # not (1 + 1/2 + 0) / 3
    assert m.macro_f1 == pytest.approx((1 + 2 / 3) / 2)
    assert set(m.per_class_recall) == {"cat", "dog"}
    assert set(m.per_class_f1) == {"cat", "dog"}
    assert m.confusion == matrix  # the matrix still shows every class


def test_as_dict_is_the_eval_json_shape() -> None:
    doc = classification_metrics(torch.tensor(HAND), CLASSES).as_dict("test")
    for key in ["split", "n", "accuracy", "uar", "war", "macro_f1", "per_class_recall", "confusion_matrix"]:
        assert key in doc
    assert doc["split"] == "test"
    assert doc["confusion_matrix"] == HAND
    assert doc["classes"] == CLASSES
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc  # strict JSON, round-trips


def test_empty_input_is_a_user_error() -> None:
    empty = confusion_matrix(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64), 3)
    assert empty.tolist() == [[0, 0, 0]] * 3
    with pytest.raises(MmkitError, match="n = 0"):
        classification_metrics(empty, CLASSES)


def test_bad_inputs_are_user_errors() -> None:
    with pytest.raises(MmkitError, match="label 3 is outside 0..2"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(MmkitError, match="prediction -1"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, -1]), 3)
    with pytest.raises(MmkitError, match="equal length"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)
    with pytest.raises(MmkitError, match="2 class names for a 3-class"):
        classification_metrics(torch.tensor(HAND), ["cat", "dog"])
