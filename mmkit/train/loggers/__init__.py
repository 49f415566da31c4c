"""Loggers a run writes to besides its own files (`mmkit train --log NAME`, repeatable), one file
each: `tensorboard` (event files in RUN/tb/) and `mlflow` (a tracking store; RUN/mlflow.json holds
the run's id). Each is a reporter (mmkit.train.report) that rank 0 alone runs. They import their
package when a run opens them, never before: `mmkit --help` stays fast."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmkit.errors import MmkitError

# name → (the modules it needs, the extra that installs them)
LOGGERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "mmkit-cli[tensorboard]"),
    "mlflow": (("mlflow", "sqlalchemy"), "mmkit-cli[mlflow]"),  # sqlalchemy: the default sqlite store
}

def check_loggers(names: Sequence[str]) -> tuple[str, ...]:
    """`names` without repeats, in order; an unknown name, or one whose package is not installed,
    is refused in one line saying what to install."""
    for name in names:
        if name not in LOGGERS:
            raise MmkitError(f"--log {name}: unknown logger; valid: {', '.join(LOGGERS)}")
        modules, extra = LOGGERS[name]
        missing = [module for module in modules if importlib.util.find_spec(module) is None]
        if missing:
            raise MmkitError(f"--log {name} needs {' and '.join(missing)}: pip install '{extra}'")
    return tuple(dict.fromkeys(names))


def open_loggers(run_dir: Path, names: Sequence[str]) -> list[Any]:
    """The reporters of `names` for the run in `run_dir` (rank 0 only)."""
    loggers: list[Any] = []
    for name in check_loggers(names):
        if name == "tensorboard":
            from mmkit.train.loggers.tensorboard import TensorBoardLogger

            loggers.append(TensorBoardLogger(run_dir))
        else:
            from mmkit.train.loggers.mlflow import MlflowLogger

            loggers.append(MlflowLogger(run_dir))
    return loggers
