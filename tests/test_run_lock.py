"""One writer per run directory: while a process writes a run (it holds RUN/.lock), `train --out`
and `resume` of that directory are refused with one line naming its pid, and `eval` warns; the
kernel drops the lock when the holder dies, so after a `kill -9` the run goes on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from runhelpers import trained_run
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.train.rundir import LOCK_FILE, RunLocked, lock_holder, run_lock

pytestmark = pytest.mark.skipif(os.name != "posix", reason="runs are locked with flock (POSIX)")

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = ("train", "multichannel", "--preset", "quick", "--epochs", "2", "--train-fraction", "0.05")
HOLD = """
import sys, time
from contextlib import ExitStack
from pathlib import Path
from mmkit.train.rundir import run_lock
with ExitStack() as stack:
    for name in sys.argv[1:]:
        stack.enter_context(run_lock(Path(name), create=True))
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (2 epochs of 8 steps); tests copy it."""
    return trained_run(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.fixture
def run(tiny: Path, tmp_path: Path) -> Path:
    target = tmp_path / "R"
    shutil.copytree(tiny, target)
    return target


@contextmanager
def writer(*run_dirs: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock of `run_dirs` (created when missing) until the block ends,
    where it is killed with SIGKILL."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, run_dirs)], stdout=subprocess.PIPE,
                               text=True, env=env)
    try:
        assert process.stdout is not None and process.stdout.readline() == "locked\n"
        yield process
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def refusal(run_dir: Path, pid: int) -> str:
    return (f"mmkit: error: {run_dir} is being written by another process (pid {pid}); wait until it ends or "
            f"stop it, then try again")


def test_train_and_resume_of_a_run_being_written_are_refused_naming_the_pid(run: Path, tmp_path: Path) -> None:
    new = tmp_path / "new"
    before = sorted(p.name for p in run.rglob("*"))
    with writer(run, new) as holder:
        for argv, run_dir in (([*TINY, "--out", str(new)], new), ([*TINY, "--out", str(run)], run),
                              (["resume", str(run), "--epochs", "3"], run),
                              (["resume", str(run), "--nproc-per-node", "2"], run)):
            result = runner.invoke(app, argv)
            assert result.exit_code == 2, result.output
            assert result.stderr.splitlines() == [refusal(run_dir, holder.pid)], argv
            assert result.stdout == ""
        assert sorted(p.name for p in new.iterdir()) == [LOCK_FILE]  # nothing written, nothing cleaned
        assert sorted(p.name for p in run.rglob("*")) == before


def test_after_the_writer_is_killed_with_sigkill_train_and_resume_go_on(run: Path, tmp_path: Path) -> None:
    new = tmp_path / "new"
    with writer(run, new) as holder:
        pass  # killed with SIGKILL on leaving: no chance to release anything itself
    assert (new / LOCK_FILE).read_text() == f"{holder.pid}\n"  # its pid is left in the file, its lock is not
    assert lock_holder(run) is None and lock_holder(new) is None

    result = runner.invoke(app, ["resume", str(run), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "from step-00000016" in result.stderr
    result = runner.invoke(app, [*TINY, "--out", str(new)])
    assert result.exit_code == 0, result.output
    assert (new / "metrics.json").is_file()
    assert (new / LOCK_FILE).read_text() == ""  # released at the end, no pid left behind


def test_eval_of_a_run_being_written_warns_and_evaluates_its_complete_checkpoint(run: Path) -> None:
    with writer(run) as holder:
        result = runner.invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert '"checkpoint": "step-00000016"' in result.stdout
    assert result.stderr.splitlines() == [f"mmkit: warning: {run} is still being written (by pid {holder.pid}); "
                                          "evaluating the complete checkpoint it has now"]


def test_the_lock_helper_refuses_a_second_holder_and_is_free_again_after(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        assert lock_holder(tmp_path) == f"pid {os.getpid()}"
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    assert lock_holder(tmp_path) is None
    with run_lock(tmp_path):  # free again
        pass
