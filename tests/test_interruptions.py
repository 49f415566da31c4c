"""Interrupted runs: kill -9 anywhere, signals mid-epoch, damaged checkpoints; resume stays exact.

The kill -9 tests run the real `mmkit train` in a subprocess through a small driver that wraps one
mmkit function and sends SIGKILL to its own process at a chosen point (before an optimizer step,
between two micro-batches of a gradient-accumulation cycle, halfway through writing a checkpoint).
Nothing in mmkit knows about the driver: the process dies exactly as under `kill -9`.
"""

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
from runhelpers import assert_bitwise_equal, history, last_checkpoint, last_model, losses, trained_run
from typer.testing import CliRunner

from mmkit.cli.app import app

runner = CliRunner()
TRAIN = ("train", "multichannel", "--preset", "quick", "--epochs", "3", "--train-fraction", "1.0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory.mktemp("whole"), TRAIN)


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


# ---------------------------------------------------------------------------------------------
# kill -9: same recipe throughout — 2 epochs of 79 steps, gradient accumulation over 2
# micro-batches, and a checkpoint every 30 optimizer steps besides the one at each epoch's end:
# steps 30, 60, 79 (end of epoch 1), 90, 120, 158 (end of epoch 2)

KILL_TRAIN = ("train", "multichannel", "--preset", "quick", "--epochs", "2",
              "--set", "grad_accum=2", "--set", "checkpoint_every_steps=30")
STEPS_PER_EPOCH = 79  # 2500 training samples (train_fraction 0.5) in batches of 32

DRIVER = """
import os, signal, sys
import mmkit.train.checkpoint as checkpoint
import mmkit.train.engine as engine
from mmkit.cli.app import main

point, at = sys.argv[1], int(sys.argv[2])
calls = 0

def kill_on(call):  # SIGKILL: no handler, no cleanup, no flush -- exactly `kill -9`
    global calls
    calls += 1
    if calls == at:
        os.kill(os.getpid(), signal.SIGKILL)

if point == "before-step":  # before optimizer step number `at` (1-based) starts
    step = engine.StepRunner.step
    def wrapped(self, *args, **kwargs):
        kill_on(None)
        return step(self, *args, **kwargs)
    engine.StepRunner.step = wrapped
elif point == "between-micro-batches":  # after the first micro-batch of a step, before the second
    micro = engine.training_step
    def wrapped(*args, **kwargs):
        result = micro(*args, **kwargs)
        if not kwargs["step_optimizer"]:
            kill_on(None)
        return result
    engine.training_step = wrapped
elif point == "writing-checkpoint":  # model.safetensors of checkpoint `at` written, the rest not
    save = checkpoint.save_file
    def wrapped(tensors, path, metadata=None):
        save(tensors, path, metadata=metadata)
        if path.name == "model.safetensors":
            kill_on(None)
    checkpoint.save_file = wrapped
sys.argv = ["mmkit", *sys.argv[3:]]
main()
"""


@pytest.fixture(scope="module")
def uninterrupted_accumulating(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory.mktemp("whole"), KILL_TRAIN)


def no_leftovers(run: Path) -> list[str]:
    return [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]


@pytest.mark.parametrize(
    ("point", "at", "resumes_from_step"),
    [
        ("before-step", 80, 79),  # (a) at the epoch boundary: before the first step of epoch 2
        ("before-step", 129, 120),  # (b) mid-epoch, 8 steps after a mid-epoch checkpoint
        ("between-micro-batches", 124, 120),  # (c) inside the gradient-accumulation cycle of step 124
        ("writing-checkpoint", 4, 79),  # (d) halfway through writing the 4th checkpoint (step 90)
    ],
    ids=["epoch-boundary", "mid-epoch", "mid-accumulation", "mid-checkpoint-write"],
)
def test_kill_9_then_resume_is_bitwise_identical(
    tmp_path: Path, uninterrupted_accumulating: Path, point: str, at: int, resumes_from_step: int
) -> None:
    run = tmp_path / "R"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    process = subprocess.run(
        [sys.executable, str(driver), point, str(at), *KILL_TRAIN, "--out", str(run)],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert last_checkpoint(run).name == f"step-{resumes_from_step:08d}"
    if point == "writing-checkpoint":  # the half-written checkpoint is there, and is not a checkpoint
        assert any(name.startswith(".tmp-step-") for name in no_leftovers(run))
        assert not (run / "checkpoints" / "step-00000090").exists()

    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert f"from step-{resumes_from_step:08d}" in result.output
    assert_bitwise_equal(last_model(uninterrupted_accumulating), last_model(run))
    assert losses(run) == losses(uninterrupted_accumulating)  # no batch replayed or skipped
    assert [r["step"] for r in history(run)] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert no_leftovers(run) == []  # the dead process's temporary directory was cleaned up


def test_signal_after_the_last_step_of_an_epoch_resumes_into_validation(
    tmp_path: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmkit.train.engine as engine

    real, calls = engine.StepRunner.step, [0]

    def optimizer_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2 * 157:  # the last step of epoch 2 (5000 samples, batches of 32)
            os.kill(os.getpid(), signal.SIGTERM)  # caught by mmkit's handler after this step
        return real(self, *args, **kwargs)

    monkeypatch.setattr(engine.StepRunner, "step", optimizer_step)
    run = tmp_path / "R"
    result = runner.invoke(app, [*TRAIN, "--out", str(run)])
    assert result.exit_code == 143, result.output
    monkeypatch.setattr(engine.StepRunner, "step", real)
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "after step 157 of 157" in result.output
    assert [r["epoch"] for r in history(run)] == [1, 2, 3]
    assert_bitwise_equal(last_model(uninterrupted), last_model(run))


SLOW_STEP_DRIVER = """
import signal, sys, time
from pathlib import Path
import mmkit.train.engine as engine
from mmkit.cli.app import main

at, marker = int(sys.argv[1]), Path(sys.argv[2])
calls = 0
step = engine.StepRunner.step

def slow(self, *args, **kwargs):
    # step `at` stays outside the interpreter's reach for a minute: the main thread blocks SIGINT,
    # as a long native kernel keeps Python's handler from running
    global calls
    calls += 1
    if calls == at:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        marker.write_text("slow")
        time.sleep(60)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return step(self, *args, **kwargs)

engine.StepRunner.step = slow
sys.argv = ["mmkit", *sys.argv[3:]]
main()
"""
SLOW_TRAIN = ("train", "multichannel", "--preset", "quick", "--epochs", "1", "--train-fraction", "0.2",
              "--set", "checkpoint_every_steps=2")


def test_ctrl_c_answers_at_once_and_twice_stops_now(tmp_path: Path) -> None:
    import queue
    import threading

    whole = trained_run(tmp_path / "whole", SLOW_TRAIN)
    run, marker, driver = tmp_path / "R", tmp_path / "slow", tmp_path / "driver.py"
    driver.write_text(SLOW_STEP_DRIVER)
    process = subprocess.Popen([sys.executable, str(driver), "5", str(marker), *SLOW_TRAIN, "--out", str(run)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()

    def wait_for(text: str, seconds: float) -> str:
        """The first stderr line with `text`, which must come within `seconds`."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                continue
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {seconds} s")

    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists() and process.poll() is None
    os.kill(process.pid, signal.SIGINT)
    assert "press Ctrl-C again to stop now" in wait_for("stopping after step 5", 1.0)
    start = time.monotonic()
    os.kill(process.pid, signal.SIGINT)
    process.wait(timeout=2)
    assert time.monotonic() - start <= 2.0 and process.returncode == 130
    said = wait_for("stopped now in step 5", 1.0)
    assert "checkpoint step-00000004 is the last complete one" in said and f"mmkit resume {run}" in said
    assert json.loads((run / "checkpoints" / "last.json").read_text())["path"] == "step-00000004"
    assert (last_checkpoint(run) / "manifest.json").exists()
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert_bitwise_equal(last_model(whole), last_model(run))
