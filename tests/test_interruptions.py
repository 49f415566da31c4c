"""Interrupted runs: signals mid-epoch and damaged checkpoints; the continued run stays exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmkit.cli.app import app

runner = CliRunner()
TRAIN = ("train", "multichannel", "--preset", "quick", "--epochs", "3", "--train-fraction", "1.0")


def last_model(run: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((run / "checkpoints" / "last.json").read_text())
    return load_file(run / "checkpoints" / pointer["path"] / "model.safetensors")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("whole") / "R"
    result = runner.invoke(app, [*TRAIN, "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_epoch_checkpoints_and_resumes_exactly(
    tmp_path: Path, uninterrupted: Path, signum: int, code: int
) -> None:
    run = tmp_path / "R"
    process = subprocess.Popen(
        [sys.executable, "-m", "mmkit", *TRAIN, "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not (run / "run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the first epoch of a ~4 s run
    os.kill(process.pid, signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"mmkit resume {run}" in out.replace("\n", " ")
    pointer = json.loads((run / "checkpoints" / "last.json").read_text())
    trainer = json.loads((run / "checkpoints" / pointer["path"] / "trainer_state.json").read_text())
    assert trainer["batches_in_epoch"] > 0  # stopped inside an epoch, not at its end
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    a, b = last_model(uninterrupted), last_model(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(uninterrupted) == losses(run)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "no-manifest", "bad-json"])
def test_resume_falls_back_past_a_damaged_last_checkpoint(tmp_path: Path, damage: str) -> None:
    run = tmp_path / "R"
    result = runner.invoke(app, ["train", "multichannel", "--preset", "quick", "--epochs", "3",
                                 "--out", str(run), "--stop-after-epochs", "2"])
    assert result.exit_code == 0, result.output
    last = run / "checkpoints" / json.loads((run / "checkpoints" / "last.json").read_text())["path"]
    model_file, manifest = last / "model.safetensors", last / "manifest.json"
    if damage == "truncate":
        model_file.write_bytes(model_file.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(model_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model_file.write_bytes(bytes(data))
    elif damage == "empty":
        model_file.write_bytes(b"")
    elif damage == "no-manifest":
        manifest.unlink()
    else:
        manifest.write_text("{not json")
    # naming the damaged checkpoint explicitly is an error that names file and reason
    result = runner.invoke(app, ["eval", str(run), "--checkpoint", str(int(last.name.split("-")[1]))])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and last.name in result.stderr
    # resume warns, falls back to the previous intact checkpoint and trains the lost epoch again
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert f"checkpoint {last.name} is damaged" in result.output
    assert [json.loads(line)["epoch"] for line in (run / "history.jsonl").read_text().splitlines()] == [1, 2, 3]
