"""Atomic, durable file writes: the one writer every file mmkit keeps goes through.

A new file content is written to a temp file in the same directory, fsynced, renamed over the old
file with `os.replace`, then the directory is fsynced. A crash or a full disk leaves the old file or
the new one, never half of one; on any failure the temp file is removed and the error is raised.
Temp names carry the writer's pid (`.NAME.tmp-PID-RANDOM`, `TEMP_FILE_PATTERN`), so that leftovers
of a dead process can be told apart from a live writer's and removed.

Imports nothing from mmkit, so that every layer (plan, train, cli) can use it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# the name `temp_path` gives; group 1 is the writer's pid
TEMP_FILE_PATTERN = r"\..+\.tmp-(\d+)-[0-9a-f]+"


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX; a no-op where directories can't be opened)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """`.NAME.tmp-PID-RANDOM` next to `path`: hidden, unique, removable once PID is gone."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path to write `path`'s new content to (by any writer, e.g. safetensors'
    `save_file`); on leaving, fsync it, rename it over `path` and fsync the directory. Any failure,
    inside the block or after it, removes the temp file and is raised."""
    path = Path(path)
    temp = temp_path(path)
    try:
        yield temp
        fsync_file(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` by `data` (str is written as UTF-8), atomically and durably."""
    with atomic_path(path) as temp:
        temp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_json_atomic(path: Path, document: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """`write_atomic` of a JSON document (indented, one trailing newline)."""
    write_atomic(path, json.dumps(document, indent=indent, sort_keys=sort_keys) + "\n")
