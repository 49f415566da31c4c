"""`--log mlflow`: the run's parameters, per-step and per-epoch metrics and, at the end, run.json,
metrics.json and the best checkpoint's manifest as artifacts (needs `mmkit-cli[mlflow]`).

The tracking store is `MLFLOW_TRACKING_URI` when set, else `sqlite:///RUNS/mlflow.db` next to the
run directory (every run under runs/ in one store: `mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db`), in the experiment `mmkit`. RUN/mlflow.json records the store and the
run's id, so that `mmkit resume` goes on logging to the same MLflow run.

x is the global optimizer step, as in TensorBoard. Points are buffered and written in batches, at
the latest when a checkpoint is complete; a resumed run first reads back the last step logged for
each metric and skips the steps up to it (those a killed process had logged beyond its last
checkpoint are trained again, to the same values): the metric history has no duplicate steps."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from mmkit.atomic import write_json_atomic
from mmkit.errors import MmkitError
from mmkit.train.config import RunConfig
from mmkit.train.loggers.records import config_params, epoch_scalars
from mmkit.train.metrics import ClassificationMetrics
from mmkit.train.report import SilentReporter, StepRecord

MLFLOW_FILE = "mlflow.json"
EXPERIMENT = "mmkit"
BATCH = 200  # points per write: one sqlite transaction per 200 points instead of one per point


def default_tracking_uri(run_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else a sqlite store beside the run directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


class MlflowLogger(SilentReporter):
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.client: Any = None
        self.run_id = ""
        self.logged: dict[str, int] = {}  # metric → the last step the store holds
        self.pending: list[Any] = []
        self.finished = False
        self.metric: Any = None  # mlflow.entities.Metric, imported by start()

    def start(self, config: RunConfig, resumed_from: str | None, step: int = 0) -> None:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.metric = Metric

        for name in ("mlflow", "alembic"):  # their set-up lines (creating tables) are not the run's
            logging.getLogger(name).setLevel(logging.WARNING)
        record_path = self.run_dir / MLFLOW_FILE
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            self.client = MlflowClient(tracking_uri=record["tracking_uri"])
            self.run_id = record["run_id"]
            try:
                run = self.client.get_run(self.run_id)
            except MlflowException as exc:  # the store moved or was deleted
                raise MmkitError(f"{record_path}: MLflow run {self.run_id} not found in {record['tracking_uri']}: "
                                 f"{str(exc).splitlines()[0]}") from None
            self.client.update_run(self.run_id, status="RUNNING")
            for key in run.data.metrics:
                self.logged[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
            return
        uri = default_tracking_uri(self.run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None
            if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the working directory
                artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"mmkit.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in config_params(config.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        write_json_atomic(record_path, {"tracking_uri": uri, "run_id": self.run_id, "experiment_id": experiment_id})

    def _add(self, key: str, value: float, step: int) -> None:
        if step <= self.logged.get(key, 0):
            return  # logged before the run was resumed
        self.pending.append(self.metric(key, value, int(time.time() * 1000), step))
        self.logged[key] = step
        if len(self.pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []

    def step(self, record: StepRecord) -> None:
        self._add("train/loss", record.loss, record.step)
        self._add("train/lr", record.lr, record.step)
        self._add("train/samples_per_s", record.samples_per_s, record.step)

    def epoch_end(self, record: dict[str, Any]) -> None:
        for key, value in epoch_scalars(record).items():
            self._add(key, value, int(record["step"]))

    def checkpoint_saved(self, step: int) -> None:
        self.flush()

    def end(self, test: ClassificationMetrics | None) -> None:
        if test is not None:
            step = max(self.logged.values(), default=0)
            for name in ("accuracy", "uar", "war", "macro_f1"):
                self._add(f"test/{name}", getattr(test, name), step)
        self.flush()
        if test is None:
            return
        from mmkit.train.checkpoint import read_pointer
        from mmkit.train.rundir import METRICS_FILE, RUN_FILE

        for name in (RUN_FILE, METRICS_FILE):
            self.client.log_artifact(self.run_id, str(self.run_dir / name))
        manifest = read_pointer(self.run_dir, "best") / "manifest.json"
        if manifest.is_file():
            self.client.log_artifact(self.run_id, str(manifest), artifact_path="best_checkpoint")
        self.finished = True

    def close(self) -> None:
        """The run's status: FINISHED after its test, KILLED when it stopped before (resume sets it
        RUNNING again)."""
        if self.client is None:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status="FINISHED" if self.finished else "KILLED")
        self.client = None
