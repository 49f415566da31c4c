"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations

from collections.abc import Iterable


class MmkitError(Exception):
    """A problem the user can fix (bad name, bad value, bad file). Never a bug in mmkit."""


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> MmkitError:
    """`unknown model 'nosuch'; valid: clip, fusion, lfm2, ...`"""
    valid = ", ".join(sorted(choices)) or "(none)"
    return MmkitError(f"unknown {kind} {name!r}; valid: {valid}")
