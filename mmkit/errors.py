"""Errors the CLI reports as one line on stderr, without a traceback.

`MmkitError` is a problem the user can fix before running again (a bad name, value or file): exit
code 2. `RunStopped` is a training run that stopped itself safely (non-finite loss, disk full, out
of memory that back-off cannot fix): exit code 1, and the message names the last good checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable


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
