"""The in-memory dataset every command trains and evaluates on, and what every loader shares.

A `Dataset` holds whole tensors (`[N, ...]` per model input, `labels [N]`, `split [N]`); batches
are cut from them by tensor indexing, never by looping over samples in Python. The loaders (the
built-ins in `mmkit.data.synthetic`, tensor files in `mmkit.data.tensorfile`, the official formats
in `mmkit.data.formats`) build one; `mmkit.data.datasets.load_dataset` picks the loader. This
module imports no loader, so every loader can import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mmkit.errors import MmkitError

SPLITS = ("train", "val", "test")  # split code = position: 0 train, 1 val, 2 test
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value; identity is enough
class Dataset:
    """Whole-dataset tensors. Treat them as read-only: built-ins are shared through a cache.

    name    the built-in name, or the tensor file's path as the user gave it
    inputs  per model input (`color`, `brightness`, `audio`, `video`, `image`, `text`): [N, ...]
    labels  int64 [N], in [0, len(classes))
    split   uint8 [N]: 0 train, 1 val, 2 test
    groups  int64 [N] (e.g. the actor of each clip) or None
    classes the class names, indexed by label
    notes   how the data was made, for people: source, split rule, features (`mmkit data info`)
    """

    name: str
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    split: torch.Tensor
    groups: torch.Tensor | None
    classes: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = self.labels.shape[0] if self.labels.dim() == 1 else -1
        if n < 0 or self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.split.dtype != torch.uint8 or tuple(self.split.shape) != (n,):
            raise ValueError(f"split must be uint8 [{n}], got {self.split.dtype} {tuple(self.split.shape)}")
        if self.groups is not None and (self.groups.dtype != torch.int64 or tuple(self.groups.shape) != (n,)):
            shape = tuple(self.groups.shape)
            raise ValueError(f"groups must be int64 [{n}], got {self.groups.dtype} {shape}")
        for key, tensor in self.inputs.items():
            if tensor.dim() < 1 or tensor.shape[0] != n:
                raise ValueError(f"input {key!r} has shape {tuple(tensor.shape)}, expected [{n}, ...]")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __repr__(self) -> str:
        sizes = "/".join(str(len(self.indices(split))) for split in SPLITS)
        return f"Dataset({self.name!r}, {sizes} train/val/test, inputs={self.input_shapes()})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def indices(self, split: str) -> torch.Tensor:
        """int64 indices of the samples in `split` ("train", "val" or "test"), ascending."""
        if split not in SPLIT_CODES:
            raise MmkitError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return torch.nonzero(self.split == SPLIT_CODES[split]).flatten()

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes (no N), e.g. `{"color": (3072,), "brightness": (1024,)}`."""
        return {key: tuple(tensor.shape[1:]) for key, tensor in self.inputs.items()}

    def input_dtypes(self) -> dict[str, torch.dtype]:
        return {key: tensor.dtype for key, tensor in self.inputs.items()}

    def nbytes(self) -> int:
        """Bytes held by all of the dataset's tensors."""
        tensors = [*self.inputs.values(), self.labels, self.split]
        if self.groups is not None:
            tensors.append(self.groups)
        return sum(t.numel() * t.element_size() for t in tensors)


def stratified_subset(
    indices: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int
) -> torch.Tensor:
    """A seeded, class-stratified subset of `indices`, ascending.

    `labels` may be either form, both in use:
      - aligned with `indices` (`labels[i]` is the label of `indices[i]`, e.g. `dataset.labels[idx]`)
        — any `labels` as long as `indices` is read this way;
      - the dataset's whole label tensor (`dataset.labels`), indexed by the values in `indices`.
    (They agree whenever `indices` is all of the samples in order.) Per class with `count`
    candidates, `max(1, round(fraction * count))` of them are kept, drawn with a
    `torch.Generator` seeded by `seed`, so the same call always returns the same subset.
    `fraction >= 1` returns all of `indices`.
    """
    if not 0 < fraction:
        raise MmkitError(f"data fraction must be in (0, 1], got {fraction}")
    indices = torch.as_tensor(indices, dtype=torch.int64).flatten()
    labels = torch.as_tensor(labels).flatten()
    if fraction >= 1 or indices.numel() == 0:
        return indices.sort().values
    if labels.shape[0] == indices.shape[0]:
        candidate_labels = labels
    elif int(indices.max()) < labels.shape[0] and int(indices.min()) >= 0:
        candidate_labels = labels[indices]
    else:
        raise ValueError(f"{indices.shape[0]} indices do not fit {labels.shape[0]} labels")
    generator = torch.Generator().manual_seed(int(seed))
    kept = []
    for label in torch.unique(candidate_labels, sorted=True).tolist():
        members = indices[candidate_labels == label]
        count = members.numel()
        keep = min(count, max(1, round(fraction * count)))
        kept.append(members[torch.randperm(count, generator=generator)[:keep]])
    return torch.cat(kept).sort().values


def standardize_(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """In place: one mean and one std for the whole input, from the train samples (`train` is a
    boolean mask or indices). Every float input of the built-ins and the real formats is made so."""
    reference = x[train]
    mean, std = reference.mean(), reference.std()
    return x.sub_(mean).div_(std)


def summarize(dataset: Dataset) -> dict[str, Any]:
    """What `mmkit data info` shows, as one JSON-ready document.

    `counts[split][class]` per split and class; `groups[group][split]` per group (e.g. actor) and
    split, and `groups_in_several_splits` (empty for an actor-independent split); both None when the
    dataset has no groups.
    """
    counts = {}
    for split in SPLITS:
        per_class = torch.bincount(dataset.labels[dataset.indices(split)], minlength=dataset.num_classes)
        counts[split] = dict(zip(dataset.classes, per_class.tolist(), strict=True))
    groups, shared = None, None
    if dataset.groups is not None:
        groups = {}
        for group in torch.unique(dataset.groups, sorted=True).tolist():
            members = dataset.split[dataset.groups == group]
            groups[str(group)] = {split: int((members == code).sum()) for split, code in SPLIT_CODES.items()}
        shared = [group for group, per_split in groups.items() if sum(n > 0 for n in per_split.values()) > 1]
    return {
        "name": dataset.name,
        "n": len(dataset),
        "classes": list(dataset.classes),
        "splits": {split: len(dataset.indices(split)) for split in SPLITS},
        "inputs": {
            key: {"shape": list(tensor.shape[1:]), "dtype": str(tensor.dtype).removeprefix("torch.")}
            for key, tensor in dataset.inputs.items()
        },
        "counts": counts,
        "groups": groups,
        "groups_in_several_splits": shared,
        "notes": list(dataset.notes),
        "bytes": dataset.nbytes(),
    }


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches `iterate_batches` yields for `n` indices."""
    if batch_size < 1:
        raise MmkitError(f"batch size must be at least 1, got {batch_size}")
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def iterate_batches(
    dataset: Dataset,
    indices: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    part: tuple[int, int] = (0, 1),
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Yield `(inputs, labels)` batches over `indices`: one epoch, every index exactly once.

    With `shuffle`, the order is `indices[torch.randperm(len(indices), generator=generator)]`, so a
    seeded generator makes the epoch reproducible (and advances the generator by one draw). The
    last batch is smaller unless `drop_last`, which skips it. Batches are new tensors
    (`index_select`), on the dataset's device.

    `part=(r, k)` yields only the r-th of k contiguous slices of each batch (samples
    `n·r // k` to `n·(r + 1) // k` of a batch of n): a data-parallel rank's share of the global
    batch, drawn from the same order on every rank.
    """
    total = num_batches(len(indices), batch_size, drop_last)
    order = torch.as_tensor(indices, dtype=torch.int64).flatten()
    if shuffle:
        order = order[torch.randperm(order.numel(), generator=generator)]
    for start in range(0, total * batch_size, batch_size):
        batch = order[start : start + batch_size]
        if part != (0, 1):
            rank, parts = part
            batch = batch[batch.numel() * rank // parts : batch.numel() * (rank + 1) // parts]
        inputs = {key: tensor.index_select(0, batch) for key, tensor in dataset.inputs.items()}
        yield inputs, dataset.labels.index_select(0, batch)
