"""`train` says how long it will take before its first step, then what it measured."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.models.registry import get_model_entry, size_config
from mmkit.train.forecast import LONG_RUN_SECONDS, measured_forecast, predict_run


def test_a_long_cpu_run_names_faster_choices_that_fit_the_hour() -> None:
    entry = get_model_entry("lfm2")
    size, config = size_config(entry, "w128")
    one = predict_run(entry, config, precision="fp32", device_type="cpu", batch_size=16, train_samples=960,
                      val_samples=240, epochs=1, size=size, train_fraction=0.5)
    epochs = int(3 * LONG_RUN_SECONDS / one.epoch_seconds) + 1  # about three hours
    forecast = predict_run(entry, config, precision="fp32", device_type="cpu", batch_size=16, train_samples=960,
                           val_samples=240, epochs=epochs, size=size, train_fraction=0.5)
    assert forecast.long and forecast.total_seconds == forecast.epoch_seconds * epochs
    options = dict(forecast.faster)
    assert {option.split()[0] for option in options} >= {"--epochs", "--train-fraction"}
    assert all(0 < seconds <= LONG_RUN_SECONDS for seconds in options.values())
    fewer = int(next(o for o in options if o.startswith("--epochs")).split()[1])
    assert fewer * forecast.epoch_seconds <= LONG_RUN_SECONDS < (fewer + 1) * forecast.epoch_seconds
    short = predict_run(entry, config, precision="fp32", device_type="cpu", batch_size=16, train_samples=960,
                        val_samples=240, epochs=1, size=size, train_fraction=0.5)
    assert not short.long and short.faster == []
    measured = measured_forecast([0.3, 0.1, 0.2], short, val_share=1.0)
    assert measured.measured and measured.step_seconds == 0.2
    assert measured.epoch_seconds == short.steps_per_epoch * 0.2 + 1.0


def test_train_prints_the_prediction_before_the_first_epoch(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "multichannel", "--preset", "quick", "--epochs", "1",
                                      "--train-fraction", "0.2", "--out", str(tmp_path / "R")])
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "predicted:" in err and "measured:" in err
    assert err.index("predicted:") < err.index("measured:") < err.index("epoch   1")
    assert "test (best checkpoint)" in result.stdout and "predicted:" not in result.stdout
