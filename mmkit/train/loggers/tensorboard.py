"""`--log tensorboard`: event files in RUN/tb/ through `torch.utils.tensorboard` (needs the
`tensorboard` package: `mmkit-cli[tensorboard]`).

Every point's x is the run's global optimizer step: per step `train/loss`, `train/lr` and
`train/samples_per_s`; per epoch the history record (`val/uar`, `val/loss`, `epoch/train_loss`…)
at the epoch's last step; at the end the test metrics and the confusion matrix as an image; the
resolved config as text. A resumed run writes a new event file in the same directory with
`purge_step` = the checkpoint's step + 1: TensorBoard's reader drops the points a killed process
had written beyond that checkpoint, which the resumed run trains, and logs, again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmkit.train.charts import confusion_pixels
from mmkit.train.config import RunConfig
from mmkit.train.loggers.records import epoch_scalars
from mmkit.train.metrics import ClassificationMetrics
from mmkit.train.report import SilentReporter, StepRecord

TB_DIR = "tb"


class TensorBoardLogger(SilentReporter):
    def __init__(self, run_dir: Path) -> None:
        self.log_dir = Path(run_dir) / TB_DIR
        self.writer: Any = None
        self.last_step = 0
        self.model, self.run_name = "", Path(run_dir).name

    def start(self, config: RunConfig, resumed_from: str | None, step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        earlier = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        # flush_secs: checkpoint_saved flushes what matters; this only bounds how stale a live view is
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step + 1 if earlier else None,
                                    flush_secs=30)
        self.last_step, self.model = step, config.model
        if not earlier:
            text = json.dumps(config.model_dump(mode="json"), indent=2)
            self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def step(self, record: StepRecord) -> None:
        self.writer.add_scalar("train/loss", record.loss, record.step)
        self.writer.add_scalar("train/lr", record.lr, record.step)
        self.writer.add_scalar("train/samples_per_s", record.samples_per_s, record.step)
        self.last_step = record.step

    def epoch_end(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.last_step = max(self.last_step, step)

    def checkpoint_saved(self, step: int) -> None:
        self.writer.flush()

    def end(self, test: ClassificationMetrics | None) -> None:
        if test is not None:
            for name in ("accuracy", "uar", "war", "macro_f1"):
                self.writer.add_scalar(f"test/{name}", getattr(test, name), self.last_step)
            self._confusion_image(test)
        self.writer.flush()

    def _confusion_image(self, test: ClassificationMetrics) -> None:
        """`eval --plot`'s figure where matplotlib is installed, else the heat map's cells as pixels."""
        try:
            from mmkit.train.plots import confusion_figure

            figure = confusion_figure(test, test.classes, model=self.model, run_name=self.run_name)
        except ImportError:
            self.writer.add_image("test/confusion_matrix", confusion_pixels(test.confusion), self.last_step,
                                  dataformats="HWC")
            return
        self.writer.add_figure("test/confusion_matrix", figure, self.last_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
