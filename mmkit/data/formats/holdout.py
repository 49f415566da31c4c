"""The split of a dataset that ships only train and test sets (CIFAR-10, Fashion-MNIST): the
official test set stays the test split, and a seeded, stratified share of the official training
set is set aside as validation (`stratified_subset`: per class, round(fraction × count), at least
one), so every run on the same files sees the same three splits."""

from __future__ import annotations

import torch

from mmkit.data.core import SPLIT_CODES, stratified_subset
from mmkit.errors import MmkitError

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SPLIT_SEED = 0


def split_with_validation(
    train_labels: torch.Tensor, n_test: int, val_fraction: float, seed: int, test_set: str, train_set: str
) -> tuple[torch.Tensor, str]:
    """uint8 split codes for the samples `[official train ..., official test ...]`, and a note that
    says how they were made (`test_set` / `train_set` name the official sets in it)."""
    if not 0 < val_fraction < 1:
        raise MmkitError(f"validation fraction must be in (0, 1), got {val_fraction}")
    n_train = train_labels.shape[0]
    split = torch.full((n_train + n_test,), SPLIT_CODES["train"], dtype=torch.uint8)
    split[n_train:] = SPLIT_CODES["test"]
    split[stratified_subset(torch.arange(n_train), train_labels, val_fraction, seed)] = SPLIT_CODES["val"]
    counts = "/".join(str(int((split == code).sum())) for code in SPLIT_CODES.values())
    note = (f"split: {test_set} is the test split; validation is a seeded (seed {seed}), stratified "
            f"{val_fraction:.0%} of {train_set}, as the dataset has no validation split → {counts} train/val/test")
    return split, note
