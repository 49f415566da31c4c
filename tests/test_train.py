"""Training, exact resume and evaluation, through the CLI as users run them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from runhelpers import assert_bitwise_equal, history, last_model
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.data.tensorfile import save_tensor_file

runner = CliRunner()


def invoke(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: str) -> object:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def test_quick_multichannel_run_has_everything_and_learns(tmp_path: Path) -> None:
    run = tmp_path / "R"
    ok("train", "multichannel", "--data", "synthetic-cifar", "--preset", "quick", "--out", run)
    for name in ("run.json", "history.jsonl", "metrics.json", "checkpoints/last.json", "checkpoints/best.json"):
        assert (run / name).is_file(), name
    pointer = json.loads((run / "checkpoints" / "last.json").read_text())
    checkpoint = run / "checkpoints" / pointer["path"]
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.safetensors", "trainer_state.json"}
    assert [r["epoch"] for r in history(run)] == [1, 2, 3]
    doc = json.loads(ok("eval", run, "--json").stdout)
    assert doc["split"] == "test" and doc["n"] == 1000
    # a linear probe on the raw inputs reaches 0.67 (bench/linear_probe.py): the run must beat it
    assert doc["accuracy"] >= 0.75
    assert abs(doc["war"] - doc["accuracy"]) < 1e-9
    assert sum(map(sum, doc["confusion_matrix"])) == doc["n"]
    metrics = json.loads((run / "metrics.json").read_text())  # the run's own final test
    assert (metrics["accuracy"], metrics["uar"], metrics["confusion_matrix"]) == (
        doc["accuracy"], doc["uar"], doc["confusion_matrix"]
    )
    val = json.loads(ok("eval", run, "--split", "val", "--checkpoint", "last", "--json").stdout)
    assert val["split"] == "val"


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("multichannel", ("--train-fraction", "0.1")),
        ("multichannel", ("--train-fraction", "0.1", "--set", "precision=bf16")),
        ("lfm2", ("--size", "w64", "--train-fraction", "0.05", "--batch-size", "16")),
        ("lfm2", ("--size", "w64", "--set", "train_fraction=0.05", "--batch-size", "16", "--set", "precision=bf16")),
    ],
    ids=["multichannel-fp32", "multichannel-bf16", "lfm2-fp32", "lfm2-bf16"],
)
def test_resume_after_epoch_2_is_bitwise_identical(tmp_path: Path, model: str, extra: tuple[str, ...]) -> None:
    common = ("train", model, "--preset", "quick", "--epochs", "4", *extra)
    ok(*common, "--out", tmp_path / "whole")
    ok(*common, "--out", tmp_path / "split", "--stop-after-epochs", "2")
    assert [r["epoch"] for r in history(tmp_path / "split")] == [1, 2]
    assert not (tmp_path / "split" / "metrics.json").exists()
    ok("resume", tmp_path / "split")
    assert_bitwise_equal(last_model(tmp_path / "whole"), last_model(tmp_path / "split"))
    whole, split = history(tmp_path / "whole"), history(tmp_path / "split")
    assert [r["train_loss"] for r in whole] == [r["train_loss"] for r in split]
    assert [r["val_loss"] for r in whole] == [r["val_loss"] for r in split]


def test_resume_after_a_crash_past_the_checkpoint_trims_history(tmp_path: Path) -> None:
    """History lines logged after the last checkpoint are dropped and trained again."""
    run = tmp_path / "R"
    ok("train", "multichannel", "--preset", "quick", "--epochs", "3", "--train-fraction", "0.1", "--out", run,
       "--set", "checkpoint_every=2", "--stop-after-epochs", "2")
    lines = (run / "history.jsonl").read_text().splitlines()
    fake_epoch_3 = json.loads(lines[-1]) | {"epoch": 3, "train_loss": 123.0}
    (run / "history.jsonl").write_text("\n".join([*lines, json.dumps(fake_epoch_3)]) + "\n")
    ok("resume", run)
    assert [r["epoch"] for r in history(run)] == [1, 2, 3]
    assert history(run)[-1]["train_loss"] != 123.0


def test_resume_extends_a_finished_run(tmp_path: Path) -> None:
    run = tmp_path / "R"
    ok("train", "multichannel", "--preset", "quick", "--epochs", "2", "--train-fraction", "0.1", "--out", run)
    ok("resume", run, "--epochs", "3")
    assert [r["epoch"] for r in history(run)] == [1, 2, 3]
    assert json.loads((run / "run.json").read_text())["training"]["epochs"] == 3
    result = invoke("resume", run, "--epochs", "1")
    assert result.exit_code == 2 and "below the run's 3 epochs" in result.stderr


def test_tensor_file_with_other_widths(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    n, classes = 300, ["left", "right", "up"]
    labels = torch.arange(n) % 3
    color = torch.randn(n, 48, generator=generator) + labels[:, None].float()  # learnable
    brightness = torch.randn(n, 16, generator=generator) - labels[:, None].float()
    split = torch.zeros(n, dtype=torch.uint8)
    split[200:250], split[250:] = 1, 2
    path = tmp_path / "mine.safetensors"
    save_tensor_file(path, {"color": color, "brightness": brightness}, labels, classes, split=split)
    run = tmp_path / "R"
    ok("train", "multichannel", "--data", path, "--preset", "quick", "--out", run, "--set", "train_fraction=1.0")
    settings = json.loads((run / "run.json").read_text())["model_settings"]
    assert (settings["color_dim"], settings["brightness_dim"], settings["num_classes"]) == (48, 16, 3)
    doc = json.loads(ok("eval", run, "--json").stdout)
    assert doc["n"] == 50 and set(doc["per_class_recall"]) == set(classes)


def test_missing_data_file_is_one_line(tmp_path: Path) -> None:
    result = invoke("train", "multichannel", "--data", tmp_path / "missing.safetensors", "--out", tmp_path / "R")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "missing.safetensors" in result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "mc"
    result = runner.invoke(app, ["train", "multichannel", "--preset", "quick", "--epochs", "1", "--train-fraction", "0.1",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


def test_eval_on_data_that_does_not_fit_names_both(finished_run: Path) -> None:
    result = invoke("eval", finished_run, "--data", "synthetic-av")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "color [3072]" in line and "brightness [1024]" in line and "audio" in line and "video" in line


def test_checkpoint_of_another_model_is_refused(finished_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "sep"
    ok("train", "separate", "--preset", "quick", "--epochs", "1", "--train-fraction", "0.1", "--out", other)
    run = tmp_path / "mc"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(other / "checkpoints", run / "checkpoints")
    result = invoke("eval", run)
    assert result.exit_code == 2
    assert "'separate'" in result.stderr and "'multichannel'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_run_is_one_line(tmp_path: Path, kind: str) -> None:
    run = tmp_path / "R"
    if kind == "empty":
        run.mkdir()
    for command in ("eval", "resume"):
        result = invoke(command, run)
        assert result.exit_code == 2, command
        assert len(result.stderr.strip().splitlines()) == 1 and str(run) in result.stderr


def test_existing_run_is_not_overwritten(finished_run: Path) -> None:
    result = invoke("train", "multichannel", "--out", finished_run)
    assert result.exit_code == 2 and "mmkit resume" in result.stderr


def test_set_applies_training_settings_that_also_have_a_flag(tmp_path: Path) -> None:
    """`--set seed=1` must not be overridden by the absent `--seed` flag (nor epochs, batch size, ...)."""
    run = tmp_path / "R"
    ok("train", "multichannel", "--preset", "quick", "--set", "seed=1", "--set", "epochs=1",
       "--set", "batch_size=64", "--set", "train_fraction=0.05", "--out", run)
    training = json.loads((run / "run.json").read_text())["training"]
    assert (training["seed"], training["epochs"], training["batch_size"], training["train_fraction"]) == (1, 1, 64, 0.05)
    assert len(history(run)) == 1


def test_unknown_set_key_lists_valid_ones(tmp_path: Path) -> None:
    result = invoke("train", "multichannel", "--set", "learning_rate=1", "--out", tmp_path / "R")
    assert result.exit_code == 2 and "unknown setting 'learning_rate'" in result.stderr and "lr" in result.stderr


try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def test_plot_without_matplotlib_says_how_to_install(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now fails, installed or not
    result = invoke("eval", finished_run, "--plot", tmp_path / "plots")
    assert result.exit_code == 2 and "mmkit-cli[plot]" in result.stderr
    assert not (tmp_path / "plots").exists()


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs the plot extra (matplotlib)")
def test_plot_writes_pngs(finished_run: Path, tmp_path: Path) -> None:
    doc = json.loads(ok("eval", finished_run, "--plot", tmp_path / "plots", "--json").stdout)
    assert sorted(Path(p).name for p in doc["plots"]) == ["confusion_matrix.png", "training_curves.png"]
    for path in map(Path, doc["plots"]):
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    """multichannel has no batch-dependent layer: 4 micro-batches of 8 ≈ one batch of 32."""
    common = ("train", "multichannel", "--preset", "quick", "--epochs", "1", "--train-fraction", "0.1")
    ok(*common, "--out", tmp_path / "one")
    ok(*common, "--out", tmp_path / "four", "--set", "grad_accum=4")
    one, four = last_model(tmp_path / "one"), last_model(tmp_path / "four")
    for key in one:
        assert torch.allclose(one[key], four[key], atol=1e-5), key
    assert abs(history(tmp_path / "one")[0]["train_loss"] - history(tmp_path / "four")[0]["train_loss"]) < 1e-4
