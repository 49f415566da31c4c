"""The run directory: its file names, the one atomic writer every file in it goes through, and the
run's history and metrics.

    RUN/run.json          the resolved configuration (`RunConfig`)
    RUN/history.jsonl     one JSON object per epoch
    RUN/metrics.json      the final test metrics
    RUN/checkpoints/      step directories and the best.json / last.json pointers (checkpoint.py)

Every file is written through the atomic writer of `mmkit.atomic` (`atomic_path`, `write_atomic`,
`write_json_atomic`, re-exported here with its fsync helpers): a crash or a full disk leaves the old
file or the new one, never half of one. Its temp names carry the writer's pid, as do the checkpoint
directories' temp names, so that leftovers of dead processes can be told apart from a live writer's
and removed (`remove_stale_temp`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmkit.atomic import (  # noqa: F401  (the run directory's writer, used through this module too)
    TEMP_FILE_PATTERN,
    atomic_path,
    fsync_dir,
    fsync_file,
    write_atomic,
    write_json_atomic,
)

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"

# `.tmp-step-N-PID-RANDOM` / `.old-step-N-PID-RANDOM` (checkpoint dirs) and `.NAME.tmp-PID-RANDOM` (files)
_TEMP_PID = re.compile(rf"\.(?:tmp|old)-step-\d+-(\d+)-[0-9a-f]+|{TEMP_FILE_PATTERN}")


# --------------------------------------------------------------------------------------------------
# Leftovers of interrupted writes


def remove_stale_temp(directory: Path) -> list[Path]:
    """Delete the `.tmp-*` / `.old-*` leftovers (files or directories) in `directory` of processes
    that no longer run (a crashed or killed write); return what was removed."""
    if os.name != "posix" or not Path(directory).is_dir():  # os.kill(pid, 0) only probes on POSIX
        return []
    removed = []
    for entry in Path(directory).iterdir():
        match = _TEMP_PID.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() or process_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# --------------------------------------------------------------------------------------------------
# History and metrics


def read_history(run_dir: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The epoch records of history.jsonl, oldest first ([] when there is none).

    A line that is not an epoch record (cut off by a crash, overwritten with other bytes, JSON
    without the epoch, step and train_loss) is dropped, and one warning names the dropped lines:
    the history is a log, the checkpoints hold the state, so a damaged line never stops a run."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    records, dropped = [], []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        record = _history_record(line)
        if record is None:
            dropped.append(number)
        else:
            records.append(record)
    if dropped:
        lines = ", ".join(str(n) for n in dropped)
        (warn or _warn)(f"{path}: dropped line{'s' if len(dropped) > 1 else ''} {lines}, not an epoch record "
                        f"(damaged or cut off); kept {len(records)}")
    return records


def _history_record(line: bytes) -> dict[str, Any] | None:
    """One history line as its record, or None when it is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    counters_ok = all(isinstance(record.get(k), int) and not isinstance(record.get(k), bool) for k in ("epoch", "step"))
    loss = record.get("train_loss")
    return record if counters_ok and isinstance(loss, (int, float)) and not isinstance(loss, bool) else None


def _warn(text: str) -> None:
    print(f"mmkit: warning: {text}", file=sys.stderr)


def write_history(run_dir: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(Path(run_dir) / HISTORY_FILE, "".join(json.dumps(r) + "\n" for r in records))


def write_metrics(run_dir: Path, document: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / METRICS_FILE, document)


def remove_stale_run_temp(run_dir: Path) -> list[Path]:
    """`remove_stale_temp` of the run directory and of its checkpoints directory: what a killed or
    crashed writer left behind is gone before a new process writes the run."""
    return remove_stale_temp(Path(run_dir)) + remove_stale_temp(Path(run_dir) / CHECKPOINTS_DIR)
