"""The run directory: its file names, the one atomic writer every file in it goes through, and the
run's history and metrics.

    RUN/run.json          the resolved configuration (`RunConfig`); `resume --set` changes `RESUME_KEYS`
    RUN/history.jsonl     one JSON object per epoch
    RUN/metrics.json      the final test metrics
    RUN/checkpoints/      step directories and the best.json / last.json pointers (checkpoint.py)
    RUN/.lock             locked by the one process writing the run (`run_lock`); holds its pid

Every file is written through the atomic writer of `mmkit.atomic` (`atomic_path`, `write_atomic`,
`write_json_atomic`, re-exported here with its fsync helpers): a crash or a full disk leaves the old
file or the new one, never half of one. Its temp names carry the writer's pid, as do the checkpoint
directories' temp names, so that leftovers of dead processes can be told apart from a live writer's
and removed (`remove_stale_temp`).

One writer per run directory: `train` and `resume` hold an OS lock on `RUN/.lock` (`flock`, taken
without waiting) from before they write or clean anything until the run ends. The kernel releases
it when the process ends, however it ends, so a `kill -9` never leaves a stale lock; a second
writer is refused with one line naming the holder's pid. `lock_holder` asks without taking it
(`eval` of a live run warns). Where `flock` does not exist (not POSIX), runs are not locked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmkit.atomic import (  # noqa: F401  (the run directory's writer, used through this module too)
    TEMP_FILE_PATTERN,
    atomic_path,
    fsync_dir,
    fsync_file,
    write_atomic,
    write_json_atomic,
)
from mmkit.errors import MmkitError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from mmkit.train.distributed import World

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"

# The training settings of run.json that `mmkit resume RUN --set KEY=V` may change (each change is
# recorded in run.json's `resume_overrides`). They steer only the steps still to come: the learning
# rate (the schedule is computed from it at every step; after a NaN stop, resume with a lower one),
# gradient clipping, the run's length, how often checkpoints are written and how many are kept, and
# whether several processes replicate (ddp) or shard (fsdp) the model: checkpoints are unsharded.
# The others are fixed by what the checkpoints hold or were trained with: the batch, the seed and
# data order, the size and the model, the data, the precision, the optimizer and its weight decay
# (restored with the optimizer state), the schedule's shape and its warmup.
RESUME_KEYS = ("lr", "grad_clip", "epochs", "checkpoint_every", "checkpoint_every_steps", "keep_last", "strategy")

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


def run_json_sha256(run_dir: Path) -> str | None:
    """The sha256 of run.json's bytes as they are on disk (None when there is none): stored in each
    checkpoint, so that `resume` can tell when run.json was edited after it."""
    try:
        return hashlib.sha256((Path(run_dir) / RUN_FILE).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# One writer per run directory

# A process asking `lock_holder` holds the lock (shared) for an instant: a writer starting at that
# moment tries again for this long before it takes the lock for taken.
_LOCK_RETRY_SECONDS = 0.2
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # file systems without flock


class RunLocked(MmkitError):
    """Another process is writing the run directory."""

    def __init__(self, run_dir: Path, holder: str) -> None:
        super().__init__(f"{run_dir} is being written by another process ({holder}); wait until it ends or "
                         f"stop it, then try again")


@contextmanager
def run_lock(run_dir: Path, world: World | None = None, *, create: bool = False) -> Iterator[None]:
    """Hold the run directory's lock for the block: this process is its one writer.

    Raises `RunLocked` (one line naming the holder's pid, exit 2) when another process holds it.
    `create`: make the run directory first (a new `train --out`). In a data-parallel run (`world`)
    rank 0 takes the lock for all ranks, and every rank raises when it could not.
    """
    main = world is None or world.is_main
    fd: int | None = None
    refused: MmkitError | None = None
    if main:
        try:
            fd = _acquire(Path(run_dir), create)
        except MmkitError as exc:
            refused = exc
    if world is not None and world.broadcast(int(refused is not None)) and refused is None:
        raise MmkitError(f"{run_dir} is being written by another process")  # rank 0 has said it, naming the pid
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if fd is not None:
            _release(fd)


def lock_holder(run_dir: Path) -> str | None:
    """`pid N` of the process writing `run_dir`, or None when none is (nothing is taken)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # never locked
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire(run_dir: Path, create: bool) -> int | None:
    """Lock `run_dir/.lock` and write this process's pid in it; its descriptor (None: no flock here)."""
    path = run_dir / LOCK_FILE
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return None
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by programs this one starts
    except OSError as exc:
        raise MmkitError(f"cannot create {path} to lock the run ({exc.strerror or exc})") from None
    deadline = time.monotonic() + _LOCK_RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder(fd)
                os.close(fd)
                raise RunLocked(run_dir, holder) from None
            time.sleep(0.02)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK:
                return None  # this file system cannot lock: run unlocked, as where flock does not exist
            raise MmkitError(f"cannot lock {path} ({exc.strerror or exc})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same; a refused process cannot name the pid
    return fd


def _release(fd: int) -> None:
    """Empty the lock file (no stale pid stays in it) and close it, which releases the lock."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)


def _holder(fd: int) -> str:
    """`pid N` from the lock file, or what can be said when the holder has not written it yet."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid not yet written"
