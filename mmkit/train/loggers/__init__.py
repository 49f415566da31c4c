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

# the epoch record's fields that are not measurements
NOT_SCALARS = ("epoch", "step", "best", "world_size", "grad_accum", "task")


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


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """An epoch's history record as logger scalars: `val_uar` → `val/uar`, `train_loss` →
    `epoch/train_loss`, a continual run's `accuracies` → `test/accuracy_task1`…"""
    scalars: dict[str, float] = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            scalars[f"val/{key[4:]}" if key.startswith("val_") else f"epoch/{key}"] = float(value)
        elif key == "accuracies" and isinstance(value, list):
            scalars.update({f"test/accuracy_task{j + 1}": float(a) for j, a in enumerate(value)})
    return scalars


def config_params(config_document: dict[str, Any]) -> dict[str, str]:
    """run.json flattened to `training.lr`-style keys with string values (the runs' parameters)."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif not isinstance(value, list) or value:
            params[prefix] = str(value)

    for key in ("model", "size", "preset", "data", "device", "precision", "training", "mmkit_version",
                "torch_version"):
        walk(key, config_document.get(key))
    return params
