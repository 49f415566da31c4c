"""Checks that a loaded `Dataset` can be trained or evaluated on, before any step or file of a run.

Each problem is one `MmkitError` naming the data, the tensor and what is wrong:

- `fit_inputs`: the tensors the model takes, in the dtypes it takes. A float input stored in
  another float dtype (float64, float16, bfloat16) is converted once, with a note; integer or
  boolean data for a float input (or float data for token ids) is refused. Tensors no model input
  takes are listed once in a note and left out.
- `check_finite`: NaN or ±Inf in a float input, found in one vectorised pass per tensor, naming
  the tensor, the split and the first sample (`--allow-nonfinite` skips it).
- `check_training_samples`: a split with no training samples is refused before an "epoch" of 0
  steps.
- `check_set_matches_data`: a `--set model.*` value that contradicts what the data fixes (an input
  width, the number of classes) is refused naming both values.

This module imports no loader: `mmkit.data.datasets.load_dataset` makes the dataset, the commands
call these checks on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mmkit.data.core import SPLIT_CODES, SPLITS, Dataset
from mmkit.errors import MmkitError

NONFINITE_HINT = "fix the data, or pass --allow-nonfinite to use it as it is"


def fit_inputs(dataset: Dataset, expected: Mapping[str, torch.dtype]) -> tuple[Dataset, list[str]]:
    """`dataset` with only the inputs in `expected` (name → the model's dtype), each in that dtype.

    Returns the dataset (the same object when nothing changes) and the notes to show. The inputs
    the model needs are known to be present (`mmkit.models.registry.require_inputs`)."""
    notes: list[str] = []
    unused = sorted(set(dataset.inputs) - set(expected))
    if unused:
        notes.append(f"data {dataset.name}: ignoring tensors no input of the model takes: {', '.join(unused)}")
    inputs, converted = {}, []
    for key, tensor in dataset.inputs.items():
        if key not in expected:
            continue
        want = expected[key]
        if tensor.dtype != want:
            _check_dtype_kind(dataset.name, key, tensor.dtype, want)
            converted.append(f"{key} {_dtype_name(tensor.dtype)} → {_dtype_name(want)}")
            tensor = tensor.to(want)
        inputs[key] = tensor
    if converted:
        notes.append(f"data {dataset.name}: converted once to the model's dtypes: {', '.join(converted)}")
    if not unused and not converted:
        return dataset, notes
    return dataclasses.replace(dataset, inputs=inputs), notes


def _check_dtype_kind(name: str, key: str, have: torch.dtype, want: torch.dtype) -> None:
    """Float data converts to another float dtype and integers to another integer dtype; nothing else."""
    if want.is_floating_point and have.is_floating_point:
        return
    if not want.is_floating_point and not have.is_floating_point and not have.is_complex and have != torch.bool:
        return
    kind = "floating-point values" if want.is_floating_point else "integer token ids"
    raise MmkitError(
        f"data {name}: tensor {key!r} is {_dtype_name(have)}, but the model's {key!r} input takes {kind} "
        f"({_dtype_name(want)}); store it as {_dtype_name(want)}"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_finite(dataset: Dataset, splits: Iterable[str] = SPLITS, *, allow_nonfinite: bool = False) -> None:
    """Refuse NaN or ±Inf in the float inputs of the samples in `splits`.

    One `isfinite` pass per float tensor; the per-sample search runs only when that pass finds one."""
    if allow_nonfinite:
        return
    codes = torch.tensor([SPLIT_CODES[split] for split in splits], dtype=torch.uint8)
    for key, tensor in dataset.inputs.items():
        if not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        bad = ~finite.reshape(tensor.shape[0], -1).all(dim=1) & torch.isin(dataset.split, codes)
        if not bool(bad.any()):
            continue
        samples = torch.nonzero(bad).flatten()
        first = int(samples[0])
        value = tensor[first].flatten()
        what = "NaN" if bool(torch.isnan(value).any()) else "Inf"
        more = f" (and {samples.numel() - 1} more samples)" if samples.numel() > 1 else ""
        raise MmkitError(
            f"data {dataset.name}: tensor {key!r} holds {what} in sample {first} ({SPLITS[int(dataset.split[first])]} "
            f"split){more}; {NONFINITE_HINT}"
        )


def check_training_samples(dataset: Dataset) -> None:
    """A run needs at least one training sample (a val split that holds them all leaves none)."""
    if not bool((dataset.split == SPLIT_CODES["train"]).any()):
        sizes = ", ".join(f"{split} {len(dataset.indices(split))}" for split in SPLITS)
        raise MmkitError(
            f"data {dataset.name}: no training samples ({sizes}); give some samples split 0 (train)"
        )


def check_set_matches_data(name: str, from_data: Mapping[str, Any], model_sets: Mapping[str, Any]) -> None:
    """Refuse a `--set model.KEY=V` where the data fixes KEY to another value (a width, the classes)."""
    for key in sorted(from_data.keys() & model_sets.keys()):
        if model_sets[key] != from_data[key]:
            raise MmkitError(
                f"--set model.{key}={model_sets[key]!r} disagrees with the data {name}, which gives "
                f"{key}={from_data[key]!r}; drop the --set (the data decides it)"
            )
