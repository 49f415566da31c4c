"""`mmkit train MODEL` and `mmkit resume RUN`: thin wrappers over `mmkit.train.loop.train_run`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from mmkit.cli.common import console, one_line_errors, parse_auto_int, parse_set_options
from mmkit.errors import MmkitError


def _default_run_dir(model: str, preset: str) -> Path:
    return Path("runs") / f"{model}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


@one_line_errors
def train_cli(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    preset: Annotated[str, typer.Option("--preset", "-p", help="Training preset.")] = "quick",
    data: Annotated[str | None, typer.Option("--data", help="Built-in dataset or a .safetensors tensor file (default: the model's).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (default: the preset's).")] = None,
    batch_size: Annotated[str | None, typer.Option("--batch-size", "-b", help="Batch size or 'auto'.")] = None,
    size: Annotated[str | None, typer.Option("--size", "-s", help="Named size, wN, or 'auto'.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU preset 'auto' is fitted to (default: the preset's target, else the local device).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/MODEL-PRESET-TIME).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for model init, data order and subsets.")] = None,
    train_fraction: Annotated[
        float | None,
        typer.Option("--train-fraction", min=0.0, max=1.0, help="Stratified seeded fraction of the training split (validation and test stay full)."),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a setting: model.KEY=V or a training key (repeatable).")] = None,
    stop_after_epochs: Annotated[
        int | None,
        typer.Option("--stop-after-epochs", min=1, help="Stop after this many epochs, checkpointed and resumable with `mmkit resume`."),
    ] = None,
    compile_: Annotated[
        bool | None,
        typer.Option("--compile", help="torch.compile the model (falls back to eager with a warning where it cannot run).", show_default=False),
    ] = None,
) -> None:
    """Train a model: AMP, clipping, schedules, progress, safe checkpoints, a final test evaluation."""
    from mmkit.cli.progress import RichReporter
    from mmkit.train.loop import train_run
    from mmkit.train.prepare import prepare_run

    run_dir = out or _default_run_dir(model, preset)
    if (run_dir / "run.json").exists():
        raise MmkitError(f"{run_dir} already holds a run; continue it with `mmkit resume {run_dir}` or pick another --out")
    prepared = prepare_run(
        model, preset=preset, data=data, gpu=gpu, device=device,
        flags={"epochs": epochs, "batch_size": parse_auto_int(batch_size, "--batch-size"), "size": size, "seed": seed,
               "train_fraction": train_fraction, "compile": compile_},
        set_options=parse_set_options(set_),
    )
    reporter = RichReporter()
    with _interruptions(run_dir, reporter):
        outcome = train_run(run_dir, prepared.config, stop_after_epochs=stop_after_epochs,
                            reporter=reporter, dataset=prepared.dataset)
    _finish_message(outcome.run_dir, outcome.finished, outcome.epochs_done)


@one_line_errors
def resume_cli(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Extend the run to this many epochs in total.")] = None,
    stop_after_epochs: Annotated[int | None, typer.Option("--stop-after-epochs", min=1, help="Stop after this many epochs in total.")] = None,
) -> None:
    """Continue a run exactly where its last checkpoint left it (model, optimizer, scaler, RNG, data order)."""
    from mmkit.cli.progress import RichReporter
    from mmkit.train.checkpoint import resolve_checkpoint
    from mmkit.train.config import RunConfig
    from mmkit.train.loop import train_run

    config = RunConfig.load(run)
    resolve_checkpoint(run, "last")  # a clear error when there is nothing to resume from
    if epochs is not None:
        if epochs < config.training.epochs:
            raise MmkitError(f"--epochs {epochs} is below the run's {config.training.epochs} epochs")
        config = config.model_copy(update={"training": config.training.model_copy(update={"epochs": epochs})})
    reporter = RichReporter()
    with _interruptions(run, reporter):
        outcome = train_run(run, config, resume=True, stop_after_epochs=stop_after_epochs, reporter=reporter)
    _finish_message(outcome.run_dir, outcome.finished, outcome.epochs_done)


@contextlib.contextmanager
def _interruptions(run_dir: Path, reporter: object) -> Iterator[None]:
    """SIGINT/SIGTERM: the loop has checkpointed; say how to continue and exit 130 / 143."""
    from mmkit.train.loop import TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as stop:
        reporter.progress.stop()  # type: ignore[attr-defined]
        console.print(f"{stop}; checkpoint {stop.checkpoint.name} written. "
                      f"Continue with: mmkit resume {run_dir}", soft_wrap=True)
        raise typer.Exit(stop.exit_code) from None


def _finish_message(run_dir: Path, finished: bool, epochs_done: int) -> None:
    if finished:
        console.print(f"run saved in {run_dir} — evaluate with `mmkit eval {run_dir}`", soft_wrap=True)
    else:
        console.print(f"stopped after epoch {epochs_done}; continue with `mmkit resume {run_dir}`", soft_wrap=True)
