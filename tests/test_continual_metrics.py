"""Continual-learning metrics against matrices worked out by hand."""

from __future__ import annotations

import pytest

from mmkit.errors import MmkitError
from mmkit.train.continual_metrics import continual_metrics

# After task 0: task 0 at 0.9. After task 1: task 0 drops to 0.6, task 1 at 0.8.
# After task 2: task 0 recovers a little to 0.7, task 1 drops to 0.5, task 2 at 0.9.
# (entries above the diagonal are accuracies on tasks not yet trained: near chance)
R = [
    [0.9, 0.0, 0.1],
    [0.6, 0.8, 0.0],
    [0.7, 0.5, 0.9],
]


def test_three_tasks_by_hand() -> None:
    m = continual_metrics(R)
    assert m.average_accuracy == pytest.approx((0.7 + 0.5 + 0.9) / 3)  # 0.7
    # Avalanche: (R00 − R20 + R11 − R21) / 2 = (0.2 + 0.3) / 2
    assert m.forgetting == pytest.approx(0.25)
    # max-based: task 0 best before the end is max(0.9, 0.6) = 0.9 → 0.2; task 1: max(0.8) → 0.3
    assert m.forgetting_max == pytest.approx(0.25)
    assert m.bwt == pytest.approx(-0.25)


def test_max_based_forgetting_differs_when_a_task_improves_after_it_was_learned() -> None:
    # task 0 is learned to 0.5, improves to 0.9 while task 1 trains (positive transfer), ends at 0.6
    r = [
        [0.5, 0.0, 0.0],
        [0.9, 0.7, 0.0],
        [0.6, 0.7, 0.8],
    ]
    m = continual_metrics(r)
    assert m.forgetting == pytest.approx(((0.5 - 0.6) + (0.7 - 0.7)) / 2)  # -0.05: "negative forgetting"
    assert m.forgetting_max == pytest.approx(((0.9 - 0.6) + (0.7 - 0.7)) / 2)  # 0.15
    assert m.bwt == pytest.approx(-m.forgetting)
    assert m.average_accuracy == pytest.approx(0.7)


def test_one_task_has_nothing_to_forget() -> None:
    m = continual_metrics([[0.8]])
    assert (m.average_accuracy, m.forgetting, m.forgetting_max, m.bwt) == (0.8, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("bad", [[], [[0.5, 0.5]], [[0.1, 0.2], [0.3]]])
def test_the_matrix_must_be_square(bad) -> None:
    with pytest.raises(MmkitError, match="square"):
        continual_metrics(bad)
