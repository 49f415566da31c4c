"""A run directory that cannot be left in a dead end: a run killed before its first checkpoint,
leftovers of dead writers, damaged pointers and history, a second process, edited or impossible
state. Every test trains a tiny run (2 epochs of 8 steps) in process and damages a copy of it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from runhelpers import assert_bitwise_equal, forge_manifest, history, last_model, trained_run
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.train.schedule import learning_rate

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



def run_json(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def stored_run_json_sha256(checkpoint: Path) -> str | None:
    return json.loads((checkpoint / "trainer_state.json").read_text())["run_json_sha256"]


def test_resume_set_changes_lr_clip_and_length_with_a_warning_each_recorded_in_run_json(
    tiny: Path, tmp_path: Path
) -> None:
    run = copy_of(tiny, tmp_path)
    result = runner.invoke(app, ["resume", str(run), "--set", "lr=0.0003", "--set", "grad_clip=0.5",
                                 "--set", "epochs=3"])
    assert result.exit_code == 0, result.output
    recorded = f"(resume --set; recorded in {run / 'run.json'})"
    assert [line for line in result.stderr.splitlines() if "resume --set" in line] == [
        f"warning: lr 0.001 → 0.0003 from step 16 on {recorded}",
        f"warning: grad_clip 1.0 → 0.5 from step 16 on {recorded}",
        f"warning: epochs 2 → 3 from step 16 on {recorded}",
    ]
    assert "changed since checkpoint" not in result.stderr  # resume's own record is no edit
    config = run_json(run)
    assert config["resume_overrides"] == [
        {"key": "lr", "old": 0.001, "new": 0.0003, "at_step": 16},
        {"key": "grad_clip", "old": 1.0, "new": 0.5, "at_step": 16},
        {"key": "epochs", "old": 2, "new": 3, "at_step": 16},
    ]
    assert (config["training"]["lr"], config["training"]["grad_clip"], config["training"]["epochs"]) == (0.0003, 0.5, 3)
    # epoch 3 trained at the new lr: its last step's lr is the schedule's over 24 steps from base 0.0003
    assert [r["epoch"] for r in history(run)] == [1, 2, 3]
    assert history(run)[-1]["lr"] == learning_rate(23, base_lr=0.0003, total_steps=24, warmup_steps=1, schedule="cosine",
                                                   steps_per_epoch=8, restart_epochs=10)
    checkpoint = run / "checkpoints" / "step-00000024"
    assert stored_run_json_sha256(checkpoint) == hashlib.sha256((run / "run.json").read_bytes()).hexdigest()

    result = runner.invoke(app, ["resume", str(run), "--epochs", "4"])  # the recorded overrides stay as they are
    assert result.exit_code == 0, result.output
    assert "changed since checkpoint" not in result.stderr and "resume --set" not in result.stderr
    assert run_json(run)["resume_overrides"] == config["resume_overrides"]


def test_resume_set_epochs_below_the_run_and_continual_epochs_are_refused(tiny: Path, tmp_path: Path) -> None:
    run = copy_of(tiny, tmp_path)
    before = (run / "run.json").read_bytes()
    result = runner.invoke(app, ["resume", str(run), "--set", "epochs=1"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["mmkit: error: --set epochs=1 is below the run's 2 epochs"]
    config = run_json(run)
    config["training"] |= {"tasks": 2}  # as a continual run's run.json has it
    (run / "run.json").write_text(json.dumps(config))
    for argv in (["--set", "epochs=3"], ["--epochs", "3"]):
        result = runner.invoke(app, ["resume", str(run), *argv])
        assert result.exit_code == 2
        assert result.stderr.splitlines() == ["mmkit: error: a continual run trains tasks × epochs_per_task epochs "
                                              "(2 × 10); its length cannot change on resume"]
    (run / "run.json").write_bytes(before)


def test_an_edited_run_json_is_named_once_on_resume(tiny: Path, tmp_path: Path) -> None:
    run = copy_of(tiny, tmp_path)
    last = run / "checkpoints" / "step-00000016"
    assert stored_run_json_sha256(last) == hashlib.sha256((run / "run.json").read_bytes()).hexdigest()
    config = run_json(run)
    config["training"]["label_smoothing"] = 0.1  # edited by hand
    (run / "run.json").write_text(json.dumps(config, indent=2) + "\n")
    result = runner.invoke(app, ["resume", str(run), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if "run.json" in line] == [
        f"warning: {run / 'run.json'} changed since checkpoint step-00000016 was written (its sha256 differs from "
        "the one the checkpoint stores); resuming with the settings it holds now"
    ]
    # the next checkpoints store the file as it is now: the next resume is quiet
    result = runner.invoke(app, ["resume", str(run), "--epochs", "4"])
    assert result.exit_code == 0, result.output
    assert "changed since checkpoint" not in result.stderr


def test_checkpoints_written_before_the_run_json_hash_are_not_checked(tiny: Path, tmp_path: Path) -> None:
    run = copy_of(tiny, tmp_path)
    last = run / "checkpoints" / "step-00000016"
    state = json.loads((last / "trainer_state.json").read_text())
    del state["run_json_sha256"]  # as mmkit wrote it before it stored the hash
    (last / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    forge_manifest(last)
    config = run_json(run)
    del config["resume_overrides"]  # and run.json as it wrote it then
    config["training"]["label_smoothing"] = 0.1
    (run / "run.json").write_text(json.dumps(config, indent=2) + "\n")
    result = runner.invoke(app, ["resume", str(run), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "changed since checkpoint" not in result.stderr


def test_a_nan_stop_says_how_to_resume_with_a_lower_lr_and_that_resume_goes_on(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmkit.train import step

    run = copy_of(tiny, tmp_path)
    real = step.compute_loss
    monkeypatch.setattr(step, "compute_loss", lambda *args, **kwargs: real(*args, **kwargs) * float("nan"))
    result = runner.invoke(app, ["resume", str(run), "--epochs", "3"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"mmkit: error: loss is nan at epoch 3, step 17; stopped before any checkpoint with non-finite weights; the "
        f"last good checkpoint step-00000016 is intact; continue with `mmkit resume {run}`; a lower lr may avoid "
        f"it: `mmkit resume {run} --set lr=0.0001`")
    monkeypatch.setattr(step, "compute_loss", real)
    result = runner.invoke(app, ["resume", str(run), "--epochs", "3", "--set", "lr=0.0001"])
    assert result.exit_code == 0, result.output
    assert f"warning: lr 0.001 → 0.0001 from step 16 on (resume --set; recorded in {run / 'run.json'})" in result.stderr
    assert [r["epoch"] for r in history(run)] == [1, 2, 3]
