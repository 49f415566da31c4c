"""`mmkit eval RUN`: accuracy, UAR, WAR, macro-F1, per-class recall and the confusion matrix."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from mmkit.cli.common import AllowChangedModelOption, console, one_line_errors, print_json
from mmkit.errors import MmkitError

if TYPE_CHECKING:
    from mmkit.train.continual_metrics import ContinualMetrics
    from mmkit.train.metrics import ClassificationMetrics


@one_line_errors
def eval_cli(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    split: Annotated[str, typer.Option("--split", help="test or val.")] = "test",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best, last, or a step number.")] = "best",
    data: Annotated[str | None, typer.Option("--data", help="Evaluate on other data (default: the run's).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write PNG plots (training curves, confusion matrix) here.")] = None,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Evaluate on data holding NaN or Inf (refused otherwise).")] = False,
    allow_changed_model: AllowChangedModelOption = False,
) -> None:
    """Evaluate a run's checkpoint on its test (or validation) split."""
    import torch

    from mmkit.models.registry import build_model
    from mmkit.train.checkpoint import (
        POINTER_NAMES,
        load_checkpoint,
        load_model_state,
        resolve_checkpoint,
        resolve_pointer,
    )
    from mmkit.train.config import RunConfig
    from mmkit.train.evaluation import evaluate
    from mmkit.train.resolve import resolve_device
    from mmkit.train.rundata import load_run_data
    from mmkit.train.rundir import lock_holder

    if split not in ("test", "val"):
        raise MmkitError(f"unknown split {split!r}; valid: test, val")
    if plot is not None:
        _require_matplotlib()
    config = RunConfig.load(run, allow_changed_model=allow_changed_model)
    holder = lock_holder(run)
    if holder is not None:  # a live run: only complete checkpoints are ever read
        print(f"mmkit: warning: {run} is still being written (by {holder}); evaluating the complete "
              f"checkpoint it has now", file=sys.stderr)
    if checkpoint in POINTER_NAMES:  # a broken pointer is derived again from the step directories
        path, warning = resolve_pointer(run, checkpoint)
        if warning is not None:
            print(f"mmkit: {warning}", file=sys.stderr)
    else:
        path = resolve_checkpoint(run, checkpoint)
    model_state, _, trainer = load_checkpoint(path)
    if trainer.get("model") != config.model:
        raise MmkitError(
            f"checkpoint {path} belongs to model {trainer.get('model')!r}, but run {run} is {config.model!r}"
        )
    data_spec = data or config.data
    dataset, notes = load_run_data(config, data_spec, splits=(split,), check_nonfinite=not allow_nonfinite)
    for note in notes:  # on stderr, so that --json stays one document
        print(f"mmkit: note: {note}", file=sys.stderr)

    dev = torch.device(resolve_device(device))
    model = build_model(config.entry, config.model_config_object())
    load_model_state(model, model_state, path / "model.safetensors")
    model.to(dev)
    metrics = evaluate(model, dataset, dataset.indices(split), batch_size=config.training.eval_batch_size,
                       precision=config.precision, device=dev)
    document = metrics.as_dict(split) | {
        "run": str(run), "checkpoint": path.name, "epoch": trainer.get("epoch"), "data": data_spec,
    }
    from mmkit.train.continual import read_continual_metrics

    continual = read_continual_metrics(run)
    if continual is not None:  # a continual run: the accuracy matrix and its figures, from history
        document["continual"] = continual.as_dict()
    if plot is not None:
        from mmkit.train.rundir import read_history
        from mmkit.train.plots import write_plots

        written = write_plots(plot, read_history(run), metrics, dataset.classes, model=config.model,
                              run_name=run.resolve().name, split=split)
        document["plots"] = [str(p) for p in written]
    if json_output:
        print_json(document)
    else:
        render_metrics(metrics, dataset.classes, f"{config.model} · {run} · {path.name} · {split} split ({data_spec})")
        if continual is not None:
            render_continual(continual)
        for p in document.get("plots", []):
            console.print(f"wrote {p}")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MmkitError("--plot needs matplotlib: pip install 'mmkit-cli[plot]'") from None


def render_metrics(metrics: ClassificationMetrics, classes: tuple[str, ...], title: str) -> None:
    summary = Table(title=title, title_justify="left")
    for column in ("n", "accuracy", "UAR", "WAR", "macro-F1"):
        summary.add_column(column, justify="right")
    summary.add_row(str(metrics.n), f"{metrics.accuracy:.4f}", f"{metrics.uar:.4f}", f"{metrics.war:.4f}",
                    f"{metrics.macro_f1:.4f}")
    console.print(summary)

    matrix = Table(title="confusion matrix (rows: true class, columns: predicted; recall per row)",
                   title_justify="left")
    matrix.add_column("true \\ predicted")
    for i, _ in enumerate(classes):
        matrix.add_column(str(i), justify="right")
    matrix.add_column("recall", justify="right")
    for i, (name, row) in enumerate(zip(classes, metrics.confusion, strict=True)):
        total = sum(row) or 1
        cells = []
        for j, count in enumerate(row):
            share = count / total
            style = ("bold green" if i == j else "red") if share >= 0.15 else ("green" if i == j else "dim")
            cells.append(f"[{style}]{count}[/{style}]" if count else "[dim]·[/dim]")
        recall = metrics.per_class_recall.get(name)
        matrix.add_row(f"{i} {name}", *cells, f"{recall:.3f}" if recall is not None else "-")
    console.print(matrix)


def render_continual(metrics: ContinualMetrics) -> None:
    """R[i][j] (after task i, test accuracy on task j), with the tasks not yet trained dimmed."""
    table = Table(title="accuracy matrix R (rows: after training task i; columns: test accuracy on task j)",
                  title_justify="left")
    table.add_column("after \\ on")
    for j in range(len(metrics.matrix)):
        table.add_column(f"task {j + 1}", justify="right")
    for i, row in enumerate(metrics.matrix):
        table.add_row(f"task {i + 1}", *(f"{a:.3f}" if j <= i else f"[dim]{a:.3f}[/dim]" for j, a in enumerate(row)))
    console.print(table)
    console.print(
        f"average accuracy {metrics.average_accuracy:.3f} · forgetting {metrics.forgetting:.3f} (Avalanche: "
        f"when learned − final) · {metrics.forgetting_max:.3f} (max-based: best before − final) · "
        f"BWT {metrics.bwt:+.3f}"
    )
