"""The run directory's one atomic writer, and a failed write stopping a run with one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from safetensors import SafetensorError

from mmkit import atomic
from mmkit.errors import RunStopped
from mmkit.train import rundir
from mmkit.train.checkpoint import stop_on_write_failure

FULL_DISK = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def test_write_atomic_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_text("old")
    rundir.write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    with pytest.raises(SafetensorError):
        with rundir.atomic_path(target) as temp:
            temp.write_bytes(b"\0" * 100)  # a partial file, then safetensors' own error
            raise SafetensorError(FULL_DISK)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_safetensors_full_disk_is_one_line_naming_the_last_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(RunStopped) as stopped:
        with stop_on_write_failure(tmp_path, "the checkpoint of step 5"):
            raise SafetensorError(FULL_DISK)
    assert str(stopped.value) == ("could not write the checkpoint of step 5 (No space left on device); "
                                  "no checkpoint had been written yet; start the run again")


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [tmp_path / f".history.jsonl.tmp-{dead}-ab12", tmp_path / f".tmp-step-00000005-{dead}-cd34"]
    stale[0].write_text("x")
    stale[1].mkdir()
    live = tmp_path / f".run.json.tmp-{os.getpid()}-ef56"
    live.write_text("x")
    assert sorted(rundir.remove_stale_temp(tmp_path)) == sorted(stale)
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


def test_history_lines_that_are_not_records_are_dropped_with_one_warning(tmp_path: Path) -> None:
    good = [{"epoch": 1, "step": 8, "train_loss": 2.1}, {"epoch": 2, "step": 16, "train_loss": 1.3}]
    lines = [rundir.json.dumps(good[0]).encode(), b"\xff\xfe\x00binary", b'{"note": "no fields"}', b"[1, 2]",
             rundir.json.dumps(good[1]).encode(), b'{"epoch": 3, "step": 24, "train_lo']  # cut off by a crash
    (tmp_path / "history.jsonl").write_bytes(b"\n".join(lines))
    warnings: list[str] = []
    assert rundir.read_history(tmp_path, warnings.append) == good
    assert warnings == [f"{tmp_path / 'history.jsonl'}: dropped lines 2, 3, 4, 6, not an epoch record "
                        "(damaged or cut off); kept 2"]
    assert rundir.read_history(tmp_path / "none", warnings.append) == [] and len(warnings) == 1

def test_a_failed_metrics_write_stops_the_run_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "fsync_file", full_disk)  # the one writer every run file goes through
    with pytest.raises(RunStopped, match="could not write metrics.json .No space left on device."):
        with stop_on_write_failure(tmp_path, "metrics.json"):
            rundir.write_metrics(tmp_path, {"test_uar": 0.5})
    assert list(tmp_path.iterdir()) == []

