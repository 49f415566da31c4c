"""PNG plots of a run (needs the optional extra `mmkit-cli[plot]`, i.e. matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmkit.train.metrics import ClassificationMetrics


def write_plots(
    out_dir: Path, history: list[dict[str, Any]], metrics: ClassificationMetrics, classes: tuple[str, ...]
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    if history:
        epochs = [r["epoch"] for r in history]
        fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(10, 4))
        loss_ax.plot(epochs, [r["train_loss"] for r in history], label="train loss")
        loss_ax.plot(epochs, [r["val_loss"] for r in history], label="validation loss")
        loss_ax.set_xlabel("epoch")
        loss_ax.legend()
        score_ax.plot(epochs, [r["val_accuracy"] for r in history], label="validation accuracy (WAR)")
        score_ax.plot(epochs, [r["val_uar"] for r in history], label="validation UAR")
        score_ax.set_xlabel("epoch")
        score_ax.set_ylim(0, 1)
        score_ax.legend()
        fig.tight_layout()
        path = out_dir / "training_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    image = ax.imshow(metrics.confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(metrics.confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8)
    fig.colorbar(image)
    ax.set_title(f"UAR {metrics.uar:.3f} · WAR {metrics.war:.3f}")
    fig.tight_layout()
    path = out_dir / "confusion_matrix.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written
