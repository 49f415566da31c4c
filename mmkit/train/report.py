"""What a training run tells the outside world: the command line draws progress bars from it,
loggers (TensorBoard, MLflow: mmkit.train.loggers) write it down, tests and library callers stay
silent. `FanOut` passes every call on to several reporters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from mmkit.train.config import RunConfig
from mmkit.train.forecast import RunForecast
from mmkit.train.metrics import ClassificationMetrics


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as it is reported."""

    step: int  # 1-based global step: a resumed run goes on counting where its checkpoint stopped
    epoch: int  # 1-based
    loss: float  # the global batch's mean loss
    lr: float
    samples_per_s: float  # over the epoch so far


class Reporter(Protocol):
    """The calls a run makes, in order: start, (forecast), per epoch epoch_start, step…, epoch_end; end.
    `checkpoint_saved` follows every complete checkpoint: what a reporter holds back (a logger's
    buffered points) must be on disk by then, so that a `kill -9` loses only steps the resumed run
    trains again. `epoch_end` gets the epoch's history record (one line of history.jsonl)."""

    def start(self, config: RunConfig, resumed_from: str | None, step: int = 0) -> None: ...
    def forecast(self, forecast: RunForecast) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None: ...
    def step(self, record: StepRecord) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...
    def checkpoint_saved(self, step: int) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, test: ClassificationMetrics | None) -> None: ...


class SilentReporter:
    """A reporter that says nothing."""

    def start(self, config: RunConfig, resumed_from: str | None, step: int = 0) -> None: ...
    def forecast(self, forecast: RunForecast) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None: ...
    def step(self, record: StepRecord) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...
    def checkpoint_saved(self, step: int) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, test: ClassificationMetrics | None) -> None: ...


class FanOut:
    """Several reporters as one: each call goes to every reporter, in the order given. `close()`
    closes those that have a `close` (loggers), also when the run stopped with an exception."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def start(self, config: RunConfig, resumed_from: str | None, step: int = 0) -> None:
        for reporter in self.reporters:
            reporter.start(config, resumed_from, step)

    def forecast(self, forecast: RunForecast) -> None:
        for reporter in self.reporters:
            reporter.forecast(forecast)

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        for reporter in self.reporters:
            reporter.epoch_start(epoch, epochs, steps, done)

    def step(self, record: StepRecord) -> None:
        for reporter in self.reporters:
            reporter.step(record)

    def epoch_end(self, record: dict[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.epoch_end(record)

    def checkpoint_saved(self, step: int) -> None:
        for reporter in self.reporters:
            reporter.checkpoint_saved(step)

    def message(self, text: str) -> None:
        for reporter in self.reporters:
            reporter.message(text)

    def end(self, test: ClassificationMetrics | None) -> None:
        for reporter in self.reporters:
            reporter.end(test)

    def close(self) -> None:
        for reporter in self.reporters:
            close = getattr(reporter, "close", None)
            if close is not None:
                close()
