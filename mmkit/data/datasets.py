"""The ways to get a `Dataset`: `load_dataset` takes what a user types after `--data`.

A built-in name (`synthetic-cifar`, `synthetic-av`, `synthetic-fashion`, generated from the seed
and cached per process), a path to a tensor file (`mmkit.data.tensorfile`), or a folder of a small
real dataset in its official format (`mmkit.data.formats`). The `Dataset` itself and the helpers
every loader shares live in `mmkit.data.core` (re-exported here), which imports no loader.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmkit.data.catalog import BUILTIN_DATASETS
from mmkit.data.core import (
    SPLIT_CODES,
    SPLITS,
    Dataset,
    iterate_batches,
    num_batches,
    standardize_,
    stratified_subset,
    summarize,
)
from mmkit.data.formats import load_source_folder
from mmkit.data.tensorfile import read_tensor_file
from mmkit.errors import MmkitError

__all__ = [
    "SPLITS", "SPLIT_CODES", "Dataset", "clear_dataset_cache", "iterate_batches", "load_dataset", "num_batches",
    "standardize_", "stratified_subset", "summarize",
]

_BUILTIN_CACHE: dict[tuple[str, int], Dataset] = {}  # (name, seed) → generated once per process


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """A built-in dataset by name (generated from `seed`, cached), a `.safetensors` tensor file, or
    a folder of a small real dataset in its official format (`mmkit.data.formats`).

    A built-in name always wins over a file of the same name in the working directory. `seed`
    only affects the built-ins; a tensor file without a `split` tensor gets the same inferred
    split whatever the seed, so runs with different seeds are scored on the same test samples.
    """
    spec = os.fspath(spec)
    if spec in BUILTIN_DATASETS:
        key = (spec, int(seed))
        if key not in _BUILTIN_CACHE:
            from mmkit.data.synthetic import GENERATORS  # imported when needed: generators are large

            _BUILTIN_CACHE[key] = GENERATORS[spec](int(seed))
        return _BUILTIN_CACHE[key]

    path = Path(spec).expanduser()
    if path.is_dir():  # a real dataset in its official format, read as it is (CIFAR-10, Fashion-MNIST)
        return load_source_folder(spec)
    if path.exists() or _looks_like_path(spec):
        return read_tensor_file(spec)  # raises "data file not found: ..." when it is missing
    valid = ", ".join(sorted(BUILTIN_DATASETS))
    raise MmkitError(
        f"unknown dataset {spec!r} (no built-in of that name and no such file); "
        f"valid: {valid}, a path to a .safetensors tensor file, or a CIFAR-10 or Fashion-MNIST folder"
    )


def clear_dataset_cache() -> None:
    """Forget every generated built-in (each holds up to ~180 MiB), e.g. between many seeds."""
    _BUILTIN_CACHE.clear()


def _looks_like_path(spec: str) -> bool:
    """A spec the user clearly meant as a file: it has a directory part or a file suffix."""
    path = Path(spec)
    return bool(path.suffix) or len(path.parts) > 1 or spec.startswith(("~", "."))


def absolute_data_spec(spec: str) -> str:
    """What a run records (run.json): a built-in name as it is, a path made absolute, so that the
    run can be resumed and evaluated from any working directory."""
    spec = os.fspath(spec)
    if spec in BUILTIN_DATASETS:
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def relocated_data_spec(spec: str, run_dir: Path) -> str | None:
    """Where a relative data path recorded by mmkit 0.1.0 lies when it is not found from here: under
    the nearest directory above `run_dir` that holds it (where the run was trained from), or None
    (nothing to relocate, or nowhere found)."""
    path = Path(spec).expanduser()
    if spec in BUILTIN_DATASETS or path.is_absolute() or path.exists():
        return None
    for base in Path(os.path.abspath(run_dir)).parents:
        if (base / path).exists():
            return str(base / path)
    return None
