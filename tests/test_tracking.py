"""`--log tensorboard` and `--log mlflow`: a run killed with SIGKILL mid-epoch and resumed is read
back with TensorBoard's own event reader and with the MLflow client — every epoch's validation
UAR, every step once, in order, the same parameters, the same MLflow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runhelpers import KILL_BEFORE_STEP_DRIVER, history, last_checkpoint
from typer.testing import CliRunner

from mmkit.cli.app import app

pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install 'mmkit-cli[tensorboard]'")
pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'mmkit-cli[mlflow]'")

runner = CliRunner()
# 2 epochs of 8 steps, a checkpoint every 3 steps: killed before step 12, the last checkpoint is step 9
TINY = ("train", "multichannel", "--preset", "quick", "--epochs", "2", "--train-fraction", "0.05",
        "--set", "checkpoint_every_steps=3", "--log", "tensorboard", "--log", "mlflow")
STEPS, KILLED_BEFORE, CHECKPOINT = 16, 12, 9

# Loggers that put every point on disk at once: steps 10 and 11, logged after the last checkpoint,
# are in the files when the process is killed, and the resumed run trains and logs them again.
EAGER_LOGGERS = """
import mmkit.train.loggers.mlflow as mlflow_logger
import mmkit.train.loggers.tensorboard as tensorboard_logger
mlflow_logger.BATCH = 1
real_step = tensorboard_logger.TensorBoardLogger.step
def flushing_step(self, record):
    real_step(self, record)
    self.writer.flush()
tensorboard_logger.TensorBoardLogger.step = flushing_step
"""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run logging to both, killed before step 12 and resumed to its end (MLFLOW_TRACKING_URI set
    for the first process only: the resume finds the store in RUN/mlflow.json)."""
    folder = tmp_path_factory.mktemp("tracked")
    run, driver = folder / "runs" / "R", folder / "driver.py"
    driver.write_text(EAGER_LOGGERS + KILL_BEFORE_STEP_DRIVER)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'store.db'}"}
    process = subprocess.run([sys.executable, str(driver), str(KILLED_BEFORE), *TINY, "--out", str(run)],
                             check=False, capture_output=True, text=True, timeout=300, env=env)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert json.loads((last_checkpoint(run) / "trainer_state.json").read_text())["global_step"] == CHECKPOINT
    result = runner.invoke(app, ["resume", str(run)], env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 0, result.output
    return run


def test_run_json_keeps_the_loggers(resumed: Path) -> None:
    assert json.loads((resumed / "run.json").read_text())["log"] == ["tensorboard", "mlflow"]


def test_tensorboard_has_every_epoch_and_every_step_once_after_kill_and_resume(resumed: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((resumed / "tb").glob("events.out.tfevents.*"))) == 2  # the killed process's, the resume's
    events = EventAccumulator(str(resumed / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, STEPS + 1))  # strictly increasing: steps 10 and 11 once, not twice
    records = history(resumed)
    uar = [(e.step, e.value) for e in events.Scalars("val/uar")]
    assert uar == [(r["step"], pytest.approx(r["val_uar"], abs=1e-6)) for r in records]
    assert [s for s, _ in uar] == [8, 16]
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert events.Scalars("test/uar")[-1].value == pytest.approx(metrics["uar"], abs=1e-6)
    assert "test/confusion_matrix" in events.Tags()["images"]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_has_the_params_and_no_duplicate_steps_after_kill_and_resume(resumed: Path) -> None:
    from mlflow.tracking import MlflowClient

    record = json.loads((resumed / "mlflow.json").read_text())
    assert record["tracking_uri"] == f"sqlite:///{resumed.parent.parent / 'store.db'}"  # the first process's
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    config = json.loads((resumed / "run.json").read_text())
    params = run.data.params
    assert params["model"] == "multichannel" and params["training.lr"] == str(config["training"]["lr"])
    assert params["training.checkpoint_every_steps"] == "3" and params["size"] == config["size"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, STEPS + 1))
    uar = client.get_metric_history(run.info.run_id, "val/uar")
    assert [(m.step, m.value) for m in uar] == [(r["step"], pytest.approx(r["val_uar"])) for r in history(resumed)]
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert run.data.metrics["test/uar"] == pytest.approx(metrics["uar"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "metrics.json", "best_checkpoint"} <= artifacts
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume went on in the same run


def test_a_logger_that_is_not_installed_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    result = runner.invoke(app, ["train", "multichannel", "--log", "tensorboard", "--out", str(tmp_path / "R")])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("mmkit: error: --log tensorboard needs tensorboard: "
                                     "pip install 'mmkit-cli[tensorboard]'")
    assert not (tmp_path / "R").exists()
    result = runner.invoke(app, ["train", "multichannel", "--log", "wandb", "--out", str(tmp_path / "R")])
    assert result.exit_code == 2 and "unknown logger; valid: tensorboard, mlflow" in result.stderr


def test_only_rank_0_opens_the_loggers(tmp_path: Path) -> None:
    """Other ranks of a data-parallel run report through their rank reporter alone."""
    from mmkit.cli.progress import RankReporter
    from mmkit.cli.train import open_reporter
    from mmkit.train.distributed import World
    from mmkit.train.loggers.tensorboard import TensorBoardLogger

    for rank, expected in ((0, [RankReporter, TensorBoardLogger]), (1, [RankReporter])):
        world = World(rank=rank, size=2, local_rank=rank)
        with open_reporter(RankReporter(rank), tmp_path, ("tensorboard",), world) as reporter:
            assert [type(r) for r in reporter.reporters] == expected
