"""PNG plots of a run (needs the optional extra `mmkit-cli[plot]`, i.e. matplotlib).

Two figures, each titled with the model and the run's directory name:
- `training_curves.png`: train and validation cross-entropy per epoch on the left, validation
  accuracy (WAR) and UAR on the right, integer epoch ticks, the best epoch (the `best` checkpoint)
  marked. A continual run (no validation split) shows its train loss and, at each task's end, the
  test accuracy on every task learned so far, with the task boundaries dotted. The two curves of a panel differ in line style, marker fill and drawing order, so one
  lying exactly on the other (accuracy equals UAR on balanced data) still shows both.
- `confusion_matrix.png`: counts of one split, true class per row, predicted per column, each count
  written in white on dark cells and black on light ones.

The figures are built by `curves_figure` and `confusion_figure` without pyplot (no global state,
no display), so they can be inspected before `write_plots` saves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmkit.train.charts import PALETTE, curve_panels, text_colour_for
from mmkit.train.metrics import ClassificationMetrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
MAX_MARKERS = 30  # per curve; longer runs mark every k-th epoch so markers do not merge into a line


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def curves_figure(history: list[dict[str, Any]], *, model: str, run_name: str) -> Figure:
    """Loss and score per epoch from a run's history records."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    every = max(1, -(-len(epochs) // MAX_MARKERS))
    fig = _figure(11, 4.6)
    fig.suptitle(f"training curves · {model} · run {run_name}")
    loss_ax, score_ax = fig.subplots(1, 2, sharex=True)
    solid = {"linestyle": "-", "marker": "o", "markersize": 5, "linewidth": 1.8, "zorder": 2, "markevery": every}
    dashed = {"linestyle": "--", "marker": "o", "markersize": 9, "markerfacecolor": "none", "markeredgewidth": 1.5,
              "linewidth": 1.8, "zorder": 3, "markevery": every}

    panels = curve_panels(history)  # the same panels as the report's SVG: loss, then validation scores
    continual = any("task" in r for r in history)
    shown = [(loss_ax, panels[0])] + ([] if continual else [(score_ax, panels[1])])
    for ax, panel in shown:
        for k, series in enumerate(panel.series):
            ax.plot(series.xs, series.ys, color=PALETTE[panel.first_colour + k], label=series.label,
                    **(dashed if series.dashed else solid))
        ax.set_ylabel(panel.y_label)
        ax.set_title(panel.title)
    score_ax.set_ylim(0, 1.02)
    if continual:
        _continual_scores(score_ax, history, solid, dashed)

    best = [r["epoch"] for r in history if r.get("best")]
    for ax in (loss_ax, score_ax):
        if continual:  # where each task after the first starts
            for r, previous in zip(history[1:], history, strict=False):
                if r.get("task") != previous.get("task"):
                    ax.axvline(r["epoch"] - 0.5, color="0.55", linestyle=":", linewidth=1.2, zorder=1)
        if best:
            ax.axvline(best[-1], color="0.55", linestyle=":", linewidth=1.2, zorder=1,
                       label=f"best UAR (epoch {best[-1]})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # one point: give it room instead of a zero-width axis, and one tick
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
            ax.set_xticks(epochs)
        ax.grid(True, color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
        # below the axes, never over the curves
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False, fontsize=9)
    return fig


def _continual_scores(ax: Any, history: list[dict[str, Any]], solid: dict[str, Any], dashed: dict[str, Any]) -> None:
    """A continual run has no validation split: at the end of each task, the test accuracy on every
    task learned so far (a row of the accuracy matrix R), one line per task, and their mean."""
    ends = [r for r in history if "accuracies" in r]
    for j in range(len(ends[0]["accuracies"]) if ends else 0):
        learned = [r for r in ends if r["task"] > j]
        if learned:
            ax.plot([r["epoch"] for r in learned], [r["accuracies"][j] for r in learned], linestyle="-",
                    marker="o", markersize=4, linewidth=1.2, alpha=0.75, label=f"task {j + 1}")
    if ends:
        means = [sum(r["accuracies"][: r["task"]]) / r["task"] for r in ends]
        ax.plot([r["epoch"] for r in ends], means, color="black", label="mean over learned tasks",
                **{**dashed, "markevery": 1})
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy per task, at each task's end")


def confusion_figure(metrics: ClassificationMetrics, classes: Sequence[str], *, model: str, run_name: str,
                     split: str = "test") -> Figure:
    """The confusion matrix of one split as a heat map with the count in every cell."""
    import numpy as np

    confusion = np.asarray(metrics.confusion)
    n = len(classes)
    side = 2.6 + 0.62 * n
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(confusion, cmap="Blues", vmin=0, vmax=max(int(confusion.max()), 1))
    ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fontsize = 9 if n <= 10 else 7
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            colour = text_colour_for(image.cmap(image.norm(count)))
            ax.text(j, i, str(count), ha="center", va="center", fontsize=fontsize, color=colour,
                    fontweight="bold" if i == j else "normal")
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label(f"{'validation' if split == 'val' else split} samples")
    ax.set_title(f"{model} · run {run_name} · {split} split ({metrics.n} samples)\n"
                 f"UAR {metrics.uar:.3f} · WAR {metrics.war:.3f}")
    return fig


def write_plots(
    out_dir: Path, history: list[dict[str, Any]], metrics: ClassificationMetrics, classes: tuple[str, ...], *,
    model: str, run_name: str, split: str = "test",
) -> list[Path]:
    """Write `training_curves.png` (when there is a history) and `confusion_matrix.png` to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    if history:
        figures.append(("training_curves.png", curves_figure(history, model=model, run_name=run_name)))
    figures.append(("confusion_matrix.png",
                    confusion_figure(metrics, classes, model=model, run_name=run_name, split=split)))
    written = []
    for name, fig in figures:
        path = out_dir / name
        fig.savefig(path, dpi=DPI)
        written.append(path)
    return written
