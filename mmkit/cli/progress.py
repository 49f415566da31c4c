"""Rich progress for training: an epoch bar and a step bar with loss, lr, samples/s, the time spent
in the current step (a slow step is visibly alive) and ETA; the predicted and then measured run
time; a one-line summary per epoch. Progress, forecasts and epoch lines go to stderr; results (the
test metrics) to stdout."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from mmkit.cli.common import console, err_console, human_duration
from mmkit.train.config import RunConfig
from mmkit.train.forecast import RunForecast
from mmkit.train.metrics import ClassificationMetrics
from mmkit.train.report import SilentReporter, StepRecord


class StepElapsedColumn(ProgressColumn):
    """Seconds since the current step began, redrawn with the bar (twice a second)."""

    def render(self, task: Task) -> Text:
        started = task.fields.get("step_started")
        if started is None or task.finished:
            return Text("")
        return Text(f"step {time.monotonic() - started:4.0f} s", style="dim")


def rate(samples_per_s: float) -> str:
    """'1,234 samples/s', or '— samples/s' before anything is measured."""
    if not math.isfinite(samples_per_s) or samples_per_s <= 0:
        return "— samples/s"
    return f"{samples_per_s:,.0f} samples/s"


class RichReporter:
    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            StepElapsedColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            # each redraw costs about 2 ms of CPU time and holds the GIL; rich's default of 10 per
            # second took 2-10 % of a training step's time on a 2-core CPU (bench/overhead.py)
            refresh_per_second=2,
        )
        self.epoch_task: Any = None
        self.step_task: Any = None

    def start(self, config: RunConfig, resumed_from: str | None, step: int = 0) -> None:
        t = config.training
        head = "resuming" if resumed_from is not None else "training"
        err_console.print(
            f"[bold]{head}[/bold] {config.model} · size {config.size} · data {config.data} · preset {config.preset}"
            + (f" · from {resumed_from}" if resumed_from is not None else "")
        )
        err_console.print(
            f"  device {config.device} · {config.precision} · batch {t.batch_size}"
            f"{f' ({t.grad_accum} micro-batches)' if t.grad_accum > 1 else ''} · epochs {t.epochs} · "
            f"lr {t.lr:g} {t.schedule} (warmup {t.warmup_fraction:.0%}) · {t.optimizer} wd {t.weight_decay:g} · "
            f"clip {t.grad_clip} · label smoothing {t.label_smoothing:g} · train fraction {t.train_fraction:g} · seed {t.seed}"
        )
        for note in config.notes:
            err_console.print(f"  [yellow]note:[/yellow] {note}", soft_wrap=True)
        self.progress.start()

    def forecast(self, forecast: RunForecast) -> None:
        head = "measured" if forecast.measured else "predicted"
        self.progress.console.print(
            f"{head}: {human_duration(forecast.step_seconds)}/step × {forecast.steps_per_epoch} steps → "
            f"{human_duration(forecast.epoch_seconds)}/epoch, {human_duration(forecast.total_seconds)} for "
            f"{forecast.epochs} epoch{'s' if forecast.epochs != 1 else ''} [dim]({forecast.source}; "
            f"{'validation as predicted, ' if forecast.measured else ''}data loading not included)[/dim]",
            soft_wrap=True, highlight=False,
        )
        if forecast.faster:
            options = ", ".join(f"{option} (about {human_duration(seconds)})" for option, seconds in forecast.faster)
            self.progress.console.print(
                f"[yellow]warning:[/yellow] this run is predicted to take {human_duration(forecast.total_seconds)} "
                f"on this CPU; faster: {options}", soft_wrap=True, highlight=False,
            )

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        if self.epoch_task is None:
            self.epoch_task = self.progress.add_task("epochs", total=epochs, completed=epoch - 1, info="")
        if self.step_task is not None:
            self.progress.remove_task(self.step_task)
        self.step_task = self.progress.add_task(f"epoch {epoch}", total=steps, completed=done, info="",
                                                step_started=time.monotonic())

    def step(self, record: StepRecord) -> None:
        self.progress.update(
            self.step_task, advance=1,
            info=f"loss {record.loss:.4f} · lr {record.lr:.2e} · {rate(record.samples_per_s)}",
            step_started=time.monotonic(),
        )

    def checkpoint_saved(self, step: int) -> None: ...

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.progress.advance(self.epoch_task)
        if "task" in record:  # continual learning: no validation split, a row of R at each task's end
            line = (f"task {record['task']} · epoch {record['epoch']:>3} · train loss {record['train_loss']:.4f} · "
                    f"{record['epoch_time']:.1f} s · {rate(record['samples_per_s'])}")
            if "accuracies" in record:
                learned = record["accuracies"][: record["task"]]
                line += (f" · test accuracy on tasks 1–{record['task']}: "
                         f"{' '.join(f'{a:.3f}' for a in learned)} (mean {sum(learned) / len(learned):.3f})")
            self.progress.console.print(line, highlight=False)
            return
        self.progress.console.print(
            f"epoch {record['epoch']:>3} · train loss {record['train_loss']:.4f} · val loss {record['val_loss']:.4f}"
            f" · val acc {record['val_accuracy']:.3f} · val UAR {record['val_uar']:.3f} · "
            f"{record['epoch_time']:.1f} s · {rate(record['samples_per_s'])}"
            + (" · [green]best[/green]" if record["best"] else ""),
            highlight=False,
        )

    def message(self, text: str) -> None:
        self.progress.console.print(text, soft_wrap=True, highlight=False, markup=False)

    def end(self, test: ClassificationMetrics | None) -> None:
        self.progress.stop()
        if test is not None:
            console.print(
                f"test (best checkpoint): accuracy {test.accuracy:.3f} · UAR {test.uar:.3f} · "
                f"WAR {test.war:.3f} · macro-F1 {test.macro_f1:.3f}"
            )


class RankReporter(SilentReporter):
    """Ranks other than 0 of a data-parallel run: no progress bars, no summaries (rank 0 has them);
    only warnings, logged at warning level with the rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.logger = logging.getLogger("mmkit")

    def message(self, text: str) -> None:
        self.logger.warning("[rank %d] %s", self.rank, text)

