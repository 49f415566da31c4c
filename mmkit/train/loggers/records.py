"""What every logger writes, in its words: an epoch's record as scalars, run.json as parameters."""

from __future__ import annotations

from typing import Any

# the epoch record's fields that are not measurements
NOT_SCALARS = ("epoch", "step", "best", "world_size", "grad_accum", "task")


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
