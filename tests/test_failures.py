"""Failures a run survives: non-finite loss, a full disk, CUDA out of memory.

Each is injected by wrapping one function for the duration of a test; the assertions are on what a
user sees (exit code, one line naming the step and the last good checkpoint) and on the run
directory (no bad checkpoint written, nothing good deleted, `resume` continues exactly).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from runhelpers import assert_bitwise_equal, history, last_checkpoint, last_model
from typer.testing import CliRunner

import mmkit.train.checkpoint as checkpoint
import mmkit.train.engine as engine
import mmkit.train.step as step
from mmkit.cli.app import app
from mmkit.train.checkpoint import list_checkpoints, load_checkpoint
from mmkit.train.config import RunConfig
from mmkit.train.resolve import RunOptions, resolve_run
from mmkit.train.run import train_run

runner = CliRunner()
TRAIN = ("train", "multichannel", "--preset", "quick", "--epochs", "2")  # 79 steps per epoch


def error_line(result) -> str:
    """The one error line, which ends stderr (progress lines may come before it)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("mmkit: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def poison_loss_at(monkeypatch: pytest.MonkeyPatch, call: int, value: float) -> None:
    """Make the loss of the `call`-th forward pass (1-based, counted across runs) `value`."""
    real, calls = step.compute_loss, [0]

    def compute_loss(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * value if calls[0] == call else loss

    monkeypatch.setattr(step, "compute_loss", compute_loss)


def test_nan_loss_without_a_scaler_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "R"
    poison_loss_at(monkeypatch, 100, float("nan"))
    result = runner.invoke(app, [*TRAIN, "--out", str(run)])
    assert result.exit_code == 1, result.output
    message = error_line(result)
    assert "loss is nan at epoch 2, step 100" in message and "step-00000079 is intact" in message
    assert [p.name for p in list_checkpoints(run)] == ["step-00000079"]  # nothing written after the NaN
    model, _, _ = load_checkpoint(last_checkpoint(run))
    assert all(torch.isfinite(t).all() for t in model.values())


def test_inf_loss_with_fp16_is_skipped_by_the_scaler_whose_state_survives_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved = resolve_run(RunOptions(model="multichannel", preset="quick", epochs=2, device="cpu", train_fraction=0.1))
    config = resolved.run_config().model_copy(update={"precision": "fp16"})  # fp16 autocast + GradScaler
    real_step, scales = engine.training_step, []

    def training_step(*args, **kwargs):  # the loss scale after each step
        loss = real_step(*args, **kwargs)
        scales.append(kwargs["scaler"].get_scale())
        return loss

    monkeypatch.setattr(engine, "training_step", training_step)
    poison_loss_at(monkeypatch, 5, float("inf"))  # one overflow in epoch 1 of each run below
    train_run(tmp_path / "straight", config, dataset=resolved.dataset)
    assert scales[4] == scales[3] / 2  # the scaler saw the overflow, skipped the step, backed off

    poison_loss_at(monkeypatch, 5, float("inf"))
    split = tmp_path / "split"
    train_run(split, config, stop_after_epochs=1, dataset=resolved.dataset)
    _, _, trainer = load_checkpoint(last_checkpoint(split))
    assert trainer["scaler"]["scale"] == scales[len(scales) // 2 - 1]  # the scaler's state after epoch 1 is in the checkpoint
    train_run(split, config, resume=True, dataset=resolved.dataset)

    # a resumed scaler that started again from 2**16 would skip other steps: the weights would differ
    assert_bitwise_equal(last_model(tmp_path / "straight"), last_model(split))
    assert all(torch.isfinite(t).all() for t in last_model(split).values())
    assert [r["train_loss"] for r in history(split)] == [r["train_loss"] for r in history(tmp_path / "straight")]


def test_disk_full_stops_cleanly_and_the_last_good_checkpoint_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = (*TRAIN, "--set", "checkpoint_every_steps=30", "--set", "keep_last=1")
    reference = tmp_path / "reference"
    assert runner.invoke(app, [*recipe, "--out", str(reference)]).exit_code == 0

    real_save, saves = checkpoint.save_file, [0]

    def save_file(tensors, path, metadata=None):  # the 4th checkpoint (step 90) hits a full disk
        saves[0] += 1
        if saves[0] == 7:
            path.write_bytes(b"\0" * 1000)  # a partial file, then the error
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    run = tmp_path / "R"
    result = runner.invoke(app, [*recipe, "--out", str(run)])
    assert result.exit_code == 1, result.output
    message = error_line(result)
    assert "checkpoint of step 90 (No space left on device)" in message
    assert "step-00000079 is intact" in message and f"mmkit resume {run}" in message
    # rotation (keep_last=1) ran only after complete saves: the last good one was never deleted
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.json", "last.json", "step-00000079"]
    load_checkpoint(last_checkpoint(run))  # verifies every file against its manifest

    monkeypatch.setattr(checkpoint, "save_file", real_save)  # space freed
    assert runner.invoke(app, ["resume", str(run)]).exit_code == 0
    assert_bitwise_equal(last_model(reference), last_model(run))


def out_of_memory_above(monkeypatch: pytest.MonkeyPatch, limit: int, phase: str = "forward") -> list[int]:
    """CUDA OOM in `phase` whenever a micro-batch holds more than `limit` samples; returns the
    sizes of the micro-batches that ran."""
    real, sizes = engine.training_step, []

    def training_step(model, optimizer, inputs, labels, **kwargs):
        kwargs["on_phase"](phase)
        if labels.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        sizes.append(labels.shape[0])
        return real(model, optimizer, inputs, labels, **kwargs)

    monkeypatch.setattr(engine, "training_step", training_step)
    return sizes


def test_out_of_memory_halves_the_micro_batch_keeps_the_batch_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = out_of_memory_above(monkeypatch, 8)
    run = tmp_path / "R"
    result = runner.invoke(app, [*TRAIN, "--out", str(run), "--stop-after-epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "CUDA out of memory at step 1: micro-batch 32 → 16, grad_accum 1 → 2" in result.output
    assert "micro-batch 16 → 8, grad_accum 2 → 4; the batch per optimizer step stays 32" in result.output
    assert sizes[:4] == [8, 8, 8, 8]  # one optimizer step still sees 32 samples
    assert json.loads((run / "run.json").read_text())["training"]["grad_accum"] == 4
    assert [(r["step"], r["grad_accum"]) for r in history(run)] == [(79, 4)]

    result = runner.invoke(app, ["resume", str(run)])  # keeps grad_accum 4: no new back-off
    assert result.exit_code == 0, result.output
    assert "out of memory" not in result.output
    assert [(r["step"], r["grad_accum"]) for r in history(run)] == [(79, 4), (158, 4)]
    assert RunConfig.load(run).training.batch_size == 32


@pytest.mark.parametrize(
    ("limit", "phase", "batch", "expected"),
    [
        (0, "forward", "2", "even with a micro-batch of 1"),
        (0, "optimizer", "32", "in the optimizer step at step 1"),  # a smaller batch cannot help there
    ],
)
def test_out_of_memory_that_back_off_cannot_fix_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, phase: str, batch: str, expected: str
) -> None:
    out_of_memory_above(monkeypatch, limit, phase)
    run = tmp_path / "R"
    result = runner.invoke(app, [*TRAIN, "--batch-size", batch, "--out", str(run)])
    assert result.exit_code == 1, result.output
    assert expected in error_line(result) and "no checkpoint had been written yet" in error_line(result)
