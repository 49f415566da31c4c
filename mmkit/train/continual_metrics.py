"""Continual-learning metrics from the accuracy matrix R (Chaudhry et al. 2018, Lopez-Paz & Ranzato 2017).

R[i][j] is the accuracy on task j's test samples after training task i, for T tasks (a T×T list;
entries with j > i are measured too and describe tasks not yet learned). With F = T − 1 the final
row:

- average accuracy  = mean_j R[F][j]
- forgetting (Avalanche, `forgetting_bwt.py`): mean over j < F of R[j][j] − R[F][j]
  (accuracy when the task was first learned minus final accuracy)
- forgetting (max-based, e.g. mammoth): mean over j < F of max_{l < F} R[l][j] − R[F][j]
  (best accuracy ever seen on the task before the end, minus final; only rows l ≥ j count, since a
  task cannot have been learned before it was trained)
- backward transfer BWT = mean over j < F of R[F][j] − R[j][j]  (= −forgetting in Avalanche's sense)

With one task there is nothing to forget: forgetting and BWT are 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mmkit.errors import MmkitError


@dataclass(frozen=True)
class ContinualMetrics:
    matrix: list[list[float]]
    average_accuracy: float
    forgetting: float  # Avalanche's definition
    forgetting_max: float  # max-based definition
    bwt: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def continual_metrics(matrix: Sequence[Sequence[float]]) -> ContinualMetrics:
    """The figures above from a full T×T accuracy matrix."""
    rows = [list(map(float, row)) for row in matrix]
    tasks = len(rows)
    if tasks == 0 or any(len(row) != tasks for row in rows):
        raise MmkitError(f"an accuracy matrix must be square and non-empty, got {[len(r) for r in rows]}")
    final = tasks - 1
    average = sum(rows[final]) / tasks
    if tasks == 1:
        return ContinualMetrics(rows, average, 0.0, 0.0, 0.0)
    earlier = range(final)
    forgetting = sum(rows[j][j] - rows[final][j] for j in earlier) / final
    forgetting_max = sum(max(rows[l][j] for l in range(j, final)) - rows[final][j] for j in earlier) / final
    bwt = sum(rows[final][j] - rows[j][j] for j in earlier) / final
    return ContinualMetrics(rows, average, forgetting, forgetting_max, bwt)
