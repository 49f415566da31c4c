"""The tensor file: how users bring their own data. One `.safetensors` file (no pickle, ever).

Tensors (all with the same first dimension N):
    <input>  one per model input, named as the model names it (`color`, `brightness`, `audio`,
             `video`, `image`, `text`, ...): [N, ...], any dtype the model accepts
    label    int64 [N] (any integer dtype is accepted and read as int64), in [0, len(classes))
    split    optional uint8 [N]: 0 train, 1 val, 2 test
    group    optional int64 [N], e.g. the actor of each clip (for group-aware analyses)
Metadata (safetensors' string → string header):
    classes  a JSON list of class names, indexed by label. Without it the classes are named
             "0", "1", ... up to the largest label (at most `MAX_UNNAMED_CLASSES` of them).
    notes    optional JSON list of lines for people: where the data came from, how it was split
             and featurised (`mmkit data prepare` writes them, `mmkit data info` shows them)

Without a `split` tensor the reader makes a stratified 80/10/10 train/val/test split, seeded with
`INFERRED_SPLIT_SEED` (so every run on the file sees the same split): per class, a seeded
permutation, then round(10 %) to val, round(10 %) to test and the rest to train.

Every problem with a file is an `MmkitError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mmkit.data.core import Dataset
from mmkit.errors import MmkitError

LABEL_KEY = "label"
SPLIT_KEY = "split"
GROUP_KEY = "group"
CLASSES_KEY = "classes"
NOTES_KEY = "notes"
RESERVED_KEYS = (LABEL_KEY, SPLIT_KEY, GROUP_KEY)
INFERRED_SPLIT_SEED = 0
MAX_UNNAMED_CLASSES = 100_000  # without metadata 'classes': a larger label is a mistake, not a class
INFERRED_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test


def save_tensor_file(
    path: str | Path,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    classes: Sequence[str],
    split: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    notes: Sequence[str] = (),
) -> None:
    """Write a tensor file that `read_tensor_file` reads back into equal tensors."""
    path = Path(path)
    clash = sorted(set(inputs) & set(RESERVED_KEYS))
    if clash:
        raise MmkitError(f"{path}: input names {clash} are reserved for {', '.join(RESERVED_KEYS)}")
    tensors = dict(inputs)
    tensors[LABEL_KEY] = torch.as_tensor(labels).to(torch.int64)
    if split is not None:
        tensors[SPLIT_KEY] = torch.as_tensor(split).to(torch.uint8)
    if groups is not None:
        tensors[GROUP_KEY] = torch.as_tensor(groups).to(torch.int64)
    tensors = _own_storage(tensors)
    _validate(path, tensors, tuple(classes))  # never write a file the reader would refuse
    metadata = {CLASSES_KEY: json.dumps(list(classes))}
    if notes:
        metadata[NOTES_KEY] = json.dumps(list(notes))
    save_file(tensors, str(path), metadata=metadata)


def read_tensor_file(path: str | Path) -> Dataset:
    """Read and check a tensor file (format in the module docstring).

    Without a `split` tensor: a stratified 80/10/10 split seeded with `INFERRED_SPLIT_SEED`.
    """
    shown = str(path)  # the path as the user gave it, in messages and as the dataset's name
    path = Path(path).expanduser()
    if not path.exists():
        raise MmkitError(f"data file not found: {shown}")
    if not path.is_file():
        raise MmkitError(f"data file {shown}: not a file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:  # what parsing raises
        raise MmkitError(f"data file {shown}: not a readable safetensors file ({exc})") from None

    classes = _read_classes(shown, metadata, tensors)
    _validate(shown, tensors, classes)
    labels = tensors.pop(LABEL_KEY).to(torch.int64)
    split = tensors.pop(SPLIT_KEY, None)
    split = _inferred_split(labels) if split is None else split.to(torch.uint8)
    groups = tensors.pop(GROUP_KEY, None)
    groups = None if groups is None else groups.to(torch.int64)
    return Dataset(name=shown, inputs=tensors, labels=labels, split=split, groups=groups, classes=classes,
                   notes=_read_notes(shown, metadata))


def _own_storage(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory (safetensors refuses shared storage)."""
    seen: set[int] = set()
    result = {}
    for key, tensor in tensors.items():
        tensor = torch.as_tensor(tensor).detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        result[key] = tensor
    return result


def _read_classes(
    shown: str, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]
) -> tuple[str, ...]:
    raw = metadata.get(CLASSES_KEY)
    if raw is None:  # unnamed classes: "0", "1", ... up to the largest label
        label = tensors.get(LABEL_KEY)
        if label is None or label.numel() == 0 or label.is_floating_point() or label.dtype == torch.bool:
            return ()  # _validate reports the real problem
        low, high = int(label.min()), int(label.max())
        if low >= 0 and high >= MAX_UNNAMED_CLASSES:
            raise MmkitError(
                f"data file {shown}: labels go up to {high} and there is no metadata 'classes': that would be "
                f"{high + 1} classes (at most {MAX_UNNAMED_CLASSES} unnamed); labels must lie in [0, classes)"
            )
        return tuple(str(i) for i in range(max(high, 0) + 1))
    try:
        classes = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MmkitError(f"data file {shown}: metadata 'classes' is not valid JSON ({exc})") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise MmkitError(f"data file {shown}: metadata 'classes' must be a non-empty JSON list of names")
    if len(set(classes)) != len(classes):
        raise MmkitError(f"data file {shown}: metadata 'classes' has repeated names")
    return tuple(classes)


def _read_notes(shown: str, metadata: Mapping[str, str]) -> tuple[str, ...]:
    raw = metadata.get(NOTES_KEY)
    if raw is None:
        return ()
    try:
        notes = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MmkitError(f"data file {shown}: metadata 'notes' is not valid JSON ({exc})") from None
    if not isinstance(notes, list) or not all(isinstance(line, str) for line in notes):
        raise MmkitError(f"data file {shown}: metadata 'notes' must be a JSON list of strings")
    return tuple(notes)


def _validate(shown: str | Path, tensors: Mapping[str, torch.Tensor], classes: tuple[str, ...]) -> None:
    """Raise MmkitError naming the file unless the tensors make a usable dataset."""

    def fail(problem: str) -> MmkitError:
        return MmkitError(f"data file {shown}: {problem}")

    if LABEL_KEY not in tensors:
        raise fail(f"no {LABEL_KEY!r} tensor (found: {', '.join(sorted(tensors)) or 'none'})")
    inputs = sorted(key for key in tensors if key not in RESERVED_KEYS)
    if not inputs:
        raise fail(f"no input tensors besides {', '.join(k for k in RESERVED_KEYS if k in tensors)}")
    for key, tensor in tensors.items():
        if tensor.dim() == 0:
            raise fail(f"tensor {key!r} is a scalar; every tensor needs a first dimension N")
    sizes = {key: tensor.shape[0] for key, tensor in tensors.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{key}={n}" for key, n in sorted(sizes.items()))
        raise fail(f"tensors have different numbers of samples N ({listed})")
    if sizes[LABEL_KEY] == 0:
        raise fail("no samples (N = 0)")
    for key in RESERVED_KEYS:
        tensor = tensors.get(key)
        if tensor is None:
            continue
        if tensor.dim() != 1:
            raise fail(f"{key!r} must be one value per sample [N], got shape {tuple(tensor.shape)}")
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise fail(f"{key!r} must hold integers, got {tensor.dtype}")
    labels = tensors[LABEL_KEY]
    if not classes:
        raise fail("no class names (metadata 'classes' is empty)")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= len(classes):
        raise fail(f"labels span {low}..{high}, outside 0..{len(classes) - 1} for {len(classes)} classes")
    split = tensors.get(SPLIT_KEY)
    if split is not None:
        bad = sorted(set(torch.unique(split).tolist()) - {0, 1, 2})
        if bad:
            raise fail(f"'split' values must be 0 (train), 1 (val) or 2 (test); found {bad[:5]}")


def _inferred_split(labels: torch.Tensor) -> torch.Tensor:
    """Stratified 80/10/10: per class, a seeded permutation; round(10 %) to val and to test."""
    generator = torch.Generator().manual_seed(INFERRED_SPLIT_SEED)
    split = torch.zeros(labels.shape[0], dtype=torch.uint8)
    _, val_fraction, test_fraction = INFERRED_SPLIT_FRACTIONS
    for label in torch.unique(labels, sorted=True).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_val = round(val_fraction * members.numel())
        n_test = round(test_fraction * members.numel())
        split[members[:n_val]] = 1
        split[members[n_val : n_val + n_test]] = 2
    return split
