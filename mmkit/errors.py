"""Errors the CLI reports as one line on stderr, without a traceback.

`MmkitError` is a problem the user can fix before running again (a bad name, value or file): exit
code 2. `RunStopped` is a training run that stopped itself safely (non-finite loss, disk full, out
of memory that back-off cannot fix): exit code 1, and the message names the last good checkpoint.

A pydantic `ValidationError` (a preset, run.json, a checkpoint's trainer state, a model setting) is
reported by its first error, in one line: `first_error` / `validation_message`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # only its `errors()` is used: importing mmkit.errors stays free of pydantic
    from pydantic import ValidationError


class MmkitError(Exception):
    """A problem the user can fix (bad name, bad value, bad file). Never a bug in mmkit."""

    exit_code = 2


class RunStopped(MmkitError):
    """Training stopped on a failure it survived; the run directory is intact and resumable."""

    exit_code = 1


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> MmkitError:
    """`unknown model 'nosuch'; valid: clip, fusion, lfm2, ...`"""
    valid = ", ".join(sorted(choices)) or "(none)"
    return MmkitError(f"unknown {kind} {name!r}; valid: {valid}")


class FirstError(NamedTuple):
    """The first error of a pydantic `ValidationError`: the dotted field path ("" for the whole
    document) and its message, with ` (and N more)` when other fields are bad too."""

    field: str
    message: str


def error_field(error: Mapping[str, Any]) -> str:
    """The dotted field path of one pydantic error (`hidden.0`, `overhead.allocator_reserve_fraction`).

    A union's members show up in `loc` as e.g. "constrained-int" or "literal['a','b']": they are not
    fields the user can name, so they are left out."""
    return ".".join(str(p) for p in error["loc"] if not str(p).startswith(("constrained-", "literal[")))


def first_error(exc: ValidationError) -> FirstError:
    """The first error of `exc`, and how many other fields are bad (a union's alternatives count
    as one field), so that one line says what to fix first."""
    errors = exc.errors()
    field = error_field(errors[0])
    others = {error_field(e) for e in errors} - {field}
    more = f" (and {len(others)} more)" if others else ""
    return FirstError(field, f"{errors[0]['msg']}{more}")


def validation_message(where: Path | str, exc: ValidationError) -> str:
    """`WHERE: field 'FIELD': MESSAGE`: one line naming the file (or the settings) and the first
    bad field; `(file)` when the error is about the document as a whole."""
    first = first_error(exc)
    return f"{where}: field {first.field or '(file)'!r}: {first.message}"
