"""What every command shares: user-error handling, `--set` parsing, the `--out` check, JSON and rich output."""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table
from rich.text import Text

from mmkit.errors import MmkitError

P = ParamSpec("P")
R = TypeVar("R")

UNWRAPPED_WIDTH = 10_000  # into a pipe or a file: wide enough that no line is ever wrapped

# Set by the console entry point (mmkit.cli.app.main): this process runs one command and then exits,
# so what `import_for_command` imports may be frozen for the rest of it (never in a caller's process)
FREEZE_IMPORTS = False


def import_for_command(*modules: str) -> None:
    """Import what a command needs of torch and mmkit. In the `mmkit` process itself the garbage
    collector pauses meanwhile and every object alive is then frozen (`gc.freeze`): modules, classes
    and functions live as long as the process. Importing torch (and torch._dynamo, which the first
    Python meta kernel imports) otherwise runs several full collections, and every later one walks
    their few hundred thousand objects again (0.1–0.2 s each on a 2-core machine); simulation
    children forked later share them untouched."""
    import gc
    import importlib

    if not FREEZE_IMPORTS:
        for name in modules:
            importlib.import_module(name)
        return
    collecting = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


class _Console(Console):
    """Rich's console, wrapping at the terminal's width on a terminal. Into a pipe or a file (and
    with no COLUMNS set) it does not wrap: a message stays on one line for grep and scripts, and a
    table takes the width its cells need instead of breaking them at 80 columns."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and "COLUMNS" not in self._environ and not _writes_to_terminal(self.file):
            return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)
        return size

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self.width == UNWRAPPED_WIDTH:  # a table's title wraps at the table's width: not here
            for table in objects:
                if isinstance(table, Table) and isinstance(table.title, str):
                    title = Text.from_markup(table.title, style="table.title")
                    title.no_wrap, title.overflow = True, "ignore"
                    table.title = title
        super().print(*objects, **kwargs)


def _writes_to_terminal(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


MODEL_HELP = "Model: a registered name, package.module:factory, path/to/file.py:factory or hf:SPEC (Hugging Face)."
InputOption = Annotated[
    list[str] | None,
    typer.Option("--input", help="A plain factory's input: NAME=D1xD2x...[:dtype[:high]] (repeatable), e.g. "
                 "audio=300x80, text=77:int64:49408."),
]

AllowChangedModelOption = Annotated[
    bool, typer.Option("--allow-changed-model", help="Use the run's model file even though it changed since the run was written."),
]

console = _Console(highlight=False)
err_console = _Console(stderr=True, highlight=False)


def one_line_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn an MmkitError into one line on stderr and its exit code (2 for bad input, 1 for a run
    that stopped itself safely), without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except MmkitError as exc:
            from mmkit.cli.launch import worker_rank

            if exc.__cause__ is not None and os.environ.get("MMKIT_DEBUG", "").lower() in ("1", "true", "yes"):
                import traceback  # a user's model failed: their traceback, then the one line

                traceback.print_exception(exc.__cause__, file=sys.stderr)
            rank = worker_rank()
            if rank == 0:
                print(f"mmkit: error: {exc}", file=sys.stderr)
            elif exc.exit_code != 2:  # bad input is the same on every rank: rank 0 has said it
                print(f"mmkit: error: [rank {rank}] {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def parse_set_options(items: list[str] | None, strip_prefix: str | None = None) -> dict[str, Any]:
    """`["model.width=256", "lr=3e-4"]` → `{"model.width": 256, "lr": 0.0003}`."""
    from mmkit.models.catalog import parse_override_value  # torch-free: parsed before torch loads

    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MmkitError(f"--set expects key=value, got {item!r}")
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix) :]
        overrides[key] = parse_override_value(value.strip())
    return overrides


def parse_auto_int(value: str | None, option: str) -> int | str | None:
    """A positive integer, `auto`, or None (not given), for options such as --batch-size."""
    if value is None or value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise MmkitError(f"{option} expects a positive integer or 'auto', got {value!r}")
    return number


def print_json(document: Any) -> None:
    """Exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def human_count(n: float) -> str:
    """2365962 → '2.37M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    """Binary units: 9463848 → '9.03 MiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def human_duration(seconds: float) -> str:
    """0.4 → '400 ms', 75 → '75.0 s', 900 → '15.0 min', 9000 → '2.5 h'."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def check_out_dir(out: Path) -> None:
    """Refuse, in one line and before anything is written, an --out that cannot become a run
    directory: a file, a path under a file, a symlink loop, a directory that cannot be written."""
    error = _stat_problem(out)
    if error is not None:
        raise MmkitError(f"--out {out}: {error}")
    if not out.exists():  # the nearest existing directory above it is where the run is created
        for parent in Path(os.path.abspath(out)).parents:
            if parent.exists():
                if not parent.is_dir():
                    raise MmkitError(f"--out {out}: {parent} is a file, not a directory")
                break
    else:
        parent = out
    _check_writable(out, parent)


def _stat_problem(path: Path) -> str | None:
    """What makes `path` (or a directory above it) unusable, or None when it is a directory or missing."""
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return "is a file, not a directory"
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        above = next(p for p in Path(os.path.abspath(path)).parents if p.is_file())
        return f"{above} is a file, not a directory"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        return exc.strerror or str(exc)
    return None


def _check_writable(out: Path, directory: Path) -> None:
    """Create and remove one empty directory in `directory`: the only test that holds for every
    user (root included) and every file system (read-only mounts included)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mmkit-write-check-", dir=directory))
    except OSError as exc:
        raise MmkitError(f"--out {out}: cannot write in {directory} ({exc.strerror or exc})") from None
