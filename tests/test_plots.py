"""What `mmkit eval --plot` draws: titles, labels, integer epochs, readable counts, valid PNGs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

import torch  # noqa: E402

from mmkit.train.metrics import classification_metrics  # noqa: E402
from mmkit.train.plots import confusion_figure, curves_figure, text_colour_for, write_plots  # noqa: E402

HISTORY = [
    {"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "val_accuracy": 0.3 * e, "val_uar": 0.3 * e,
     "best": e == 2}
    for e in (1, 2, 3)
]
CLASSES = ("cat", "dog", "bird")
CONFUSION = [[50, 0, 0], [3, 40, 7], [0, 10, 40]]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_text_colour_contrasts_with_the_cell() -> None:
    assert text_colour_for((0.03, 0.19, 0.42, 1.0)) == "white"  # dark blue
    assert text_colour_for((0.0, 0.0, 0.0)) == "white"
    assert text_colour_for((0.97, 0.98, 1.0, 1.0)) == "black"  # near white
    assert text_colour_for((1.0, 0.9, 0.2)) == "black"  # yellow: bright although saturated


def test_curves_have_integer_epochs_labels_and_a_titled_run() -> None:
    fig = curves_figure(HISTORY, model="multichannel", run_name="my-run")
    FigureCanvasAgg(fig).draw()
    assert "multichannel" in fig.get_suptitle() and "my-run" in fig.get_suptitle()
    loss_ax, score_ax = fig.axes
    assert loss_ax.get_ylabel() == "cross-entropy loss" and score_ax.get_ylabel() == "score"
    for ax in (loss_ax, score_ax):
        assert ax.get_xlabel() == "epoch"
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert all(label.get_text().lstrip("−-").isdigit() for label in ax.get_xticklabels() if label.get_text())


def test_equal_accuracy_and_uar_curves_stay_distinguishable() -> None:
    fig = curves_figure(HISTORY, model="m", run_name="r")
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    uar, war = lines["validation UAR"], lines["validation accuracy (WAR)"]
    assert list(uar.get_ydata()) == list(war.get_ydata())  # the case in question: one on the other
    assert uar.get_linestyle() != war.get_linestyle()
    assert (uar.get_markerfacecolor() == "none") != (war.get_markerfacecolor() == "none")
    assert uar.get_zorder() != war.get_zorder()


def test_confusion_counts_are_white_on_dark_and_black_on_light() -> None:
    metrics = classification_metrics(torch.tensor(CONFUSION), CLASSES)
    fig = confusion_figure(metrics, CLASSES, model="clip", run_name="my-run")
    ax = fig.axes[0]
    colour_of = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_color() for t in ax.texts}
    assert colour_of[(0, 0)] == "white"  # 50, the darkest cell
    assert colour_of[(0, 1)] == "black"  # 0
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert "my-run" in ax.get_title() and "UAR" in ax.get_title() and "WAR" in ax.get_title()
    assert fig.axes[1].get_ylabel() == "test samples"  # the colour bar


def test_write_plots_writes_readable_pngs(tmp_path: Path) -> None:
    metrics = classification_metrics(torch.tensor(CONFUSION), CLASSES)
    paths = write_plots(tmp_path / "plots", HISTORY, metrics, CLASSES, model="clip", run_name="my-run")
    assert [p.name for p in paths] == ["training_curves.png", "confusion_matrix.png"]
    for path in paths:
        width, height = png_size(path)
        assert 500 <= width <= 3000 and 400 <= height <= 3000, (path.name, width, height)
    # a run without history (none recorded) still gets its confusion matrix
    assert [p.name for p in write_plots(tmp_path / "p2", [], metrics, CLASSES, model="m", run_name="r")] == [
        "confusion_matrix.png"
    ]


def test_a_continual_run_plots_its_accuracy_per_task() -> None:
    """A continual run's history has no validation split, only a row of R at each task's end."""
    history = [
        {"epoch": 1, "task": 1, "train_loss": 1.5},
        {"epoch": 2, "task": 1, "train_loss": 0.9, "accuracies": [0.8, 0.0]},
        {"epoch": 3, "task": 2, "train_loss": 2.1},
        {"epoch": 4, "task": 2, "train_loss": 1.5, "accuracies": [0.5, 0.7]},
    ]
    fig = curves_figure(history, model="clip", run_name="stream")
    lines = {line.get_label(): line for line in fig.axes[1].get_lines() if not line.get_label().startswith("_")}
    assert list(lines["task 1"].get_xdata()) == [2, 4] and list(lines["task 2"].get_xdata()) == [4]
    assert list(lines["mean over learned tasks"].get_ydata()) == pytest.approx([0.8, 0.6])
    assert fig.axes[1].get_ylabel() == "test accuracy"
