"""A run directory that cannot be left in a dead end: a run killed before its first checkpoint,
leftovers of dead writers, damaged pointers and history, a second process, edited or impossible
state. Every test trains a tiny run (2 epochs of 8 steps) in process and damages a copy of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runhelpers import assert_bitwise_equal, history, last_model, trained_run
from typer.testing import CliRunner

from mmkit.cli.app import app

runner = CliRunner()
TINY = ("train", "multichannel", "--preset", "quick", "--epochs", "2", "--train-fraction", "0.05")
DEAD_PID = 2**22 + 12345  # above the default pid_max: no such process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run; tests copy it before changing anything."""
    return trained_run(tmp_path_factory.mktemp("tiny"), TINY)


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "R"
    shutil.copytree(run, target)
    return target


def test_resume_before_the_first_checkpoint_starts_from_step_0_and_removes_stale_temp(
    tiny: Path, tmp_path: Path
) -> None:
    run = copy_of(tiny, tmp_path)
    shutil.rmtree(run / "checkpoints")
    (run / "history.jsonl").unlink()
    (run / "metrics.json").unlink()
    stale = [run / f".run.json.tmp-{DEAD_PID}-ab12cd34", run / "checkpoints" / f".tmp-step-00000003-{DEAD_PID}-ef56"]
    stale[1].mkdir(parents=True)
    stale[0].write_text("{")
    (stale[1] / "model.safetensors").write_bytes(b"\0" * 10)

    result = runner.invoke(app, ["train", *TINY[1:], "--out", str(run)])
    assert result.exit_code == 2 and f"continue it with `mmkit resume {run}`" in result.stderr

    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert f"no complete checkpoint in {run} yet: starting the run from step 0" in result.stderr
    assert not any(p.exists() for p in stale)
    assert [r["epoch"] for r in history(run)] == [1, 2]
    assert_bitwise_equal(last_model(tiny), last_model(run))  # the same run as an uninterrupted one


def test_resume_drops_damaged_history_lines_with_one_warning(tiny: Path, tmp_path: Path) -> None:
    run = copy_of(tiny, tmp_path)
    first, second = (run / "history.jsonl").read_bytes().splitlines()
    (run / "history.jsonl").write_bytes(first + b"\n\x00\xff garbage\n" + second[: len(second) // 2])
    result = runner.invoke(app, ["resume", str(run), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "history.jsonl" in line]
    assert warnings == [f"mmkit: warning: {run / 'history.jsonl'}: dropped lines 2, 3, not an epoch record "
                        "(damaged or cut off); kept 1"]
    assert [r["epoch"] for r in history(run)] == [1, 3]  # epoch 2's line is lost; the run went on

def test_broken_pointers_are_rebuilt_from_the_step_directories_and_resume_goes_on(tiny: Path, tmp_path: Path) -> None:
    run = copy_of(tiny, tmp_path)
    checkpoints = run / "checkpoints"
    (checkpoints / "best.json").unlink()
    (checkpoints / "last.json").write_text('{"step": 1')  # cut off
    result = runner.invoke(app, ["resume", str(run), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    rebuilt = [line for line in result.stderr.splitlines() if "rebuilt" in line]
    assert rebuilt == [f"warning: rebuilt best.json (missing) → step-00000016 and last.json (unreadable) → "
                       f"step-00000016 in {checkpoints} from the trainer state of the step directories"]
    assert "from step-00000016" in result.stderr  # resumed where the run was, not from scratch
    assert [r["epoch"] for r in history(run)] == [1, 2, 3]
    assert json.loads((checkpoints / "last.json").read_text())["path"] == "step-00000024"


def test_eval_with_a_pointer_to_a_missing_checkpoint_uses_the_recorded_best(tiny: Path, tmp_path: Path) -> None:
    run = copy_of(tiny, tmp_path)
    (run / "checkpoints" / "best.json").write_text('{"step": 99, "path": "step-00000099"}')
    result = runner.invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] == "step-00000016"
    assert result.stderr.strip() == (f"mmkit: warning: {run / 'checkpoints' / 'best.json'}: pointing to step-00000099, "
                                     "which is missing or incomplete; using step-00000016, found from the trainer "
                                     "state of the step directories")

