"""`train_run`: the one entry to training. It decides once which recipe the run is — plain
training (mmkit.train.loop) or class-incremental continual learning (mmkit.train.continual) —
and runs it with SIGINT/SIGTERM caught for the whole run."""

from __future__ import annotations

from pathlib import Path

from mmkit.data.datasets import Dataset
from mmkit.errors import MmkitError
from mmkit.train.config import RunConfig
from mmkit.train.continual import train_continual
from mmkit.train.distributed import SINGLE, World
from mmkit.train.engine import TrainOutcome
from mmkit.train.loop import train_plain
from mmkit.train.report import Reporter, SilentReporter
from mmkit.train.signals import StopRequest


def train_run(
    run_dir: Path,
    config: RunConfig,
    *,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    reporter: Reporter | None = None,
    dataset: Dataset | None = None,
    world: World = SINGLE,
    forecast: bool = False,
) -> TrainOutcome:
    """Train (or continue) the run in `run_dir` as `config` says; returns when done or stopped.

    SIGINT and SIGTERM are caught for the whole run (mmkit.train.signals): during training the
    current step finishes, a checkpoint is written and `TrainingInterrupted` is raised; a second
    SIGINT stops at once. After the last step the run simply completes. `world` is this process's
    rank in a data-parallel run (every rank calls `train_run`; rank 0 alone writes to `run_dir`).
    `forecast`: tell the reporter the predicted, then the measured, run time (mmkit.train.forecast).
    """
    reporter = reporter or SilentReporter()
    stop = StopRequest(run_dir, announce=reporter.message)
    with stop.installed():
        if config.training.tasks:  # class-incremental continual learning
            if world.distributed:
                raise MmkitError("continual learning runs in one process; drop --nproc-per-node")
            return train_continual(run_dir, config, resume, stop_after_epochs, reporter, dataset, stop)
        return train_plain(run_dir, config, resume, stop_after_epochs, reporter, dataset, stop, world, forecast)
