"""CIFAR-10, the official binary version (cifar-10-binary.tar.gz → cifar-10-batches-bin/).

Files: `data_batch_1.bin` … `data_batch_5.bin` (training), `test_batch.bin`, and
`batches.meta.txt` (the class names, one per line). Each record is 3073 bytes: one label byte
(0–9), then 3072 pixel bytes — 1024 red, 1024 green, 1024 blue, each plane a row-major 32×32 image.

Inputs, as `synthetic-cifar` has them (what `multichannel` and `separate` read):
    color       [3072]  the record's pixel bytes in file order (C×H×W) / 255, standardised
    brightness  [1024]  luma per pixel, 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601) of the
                        [0, 1] image, standardised
"Standardised": one mean and one std per input, from the train split (`standardize_`).

CIFAR-10 has no validation split: a seeded, stratified `val_fraction` of the training batches
(default 10 %, seed 0 → 45,000 / 5,000 / 10,000) is set aside as validation.

The "python version" (cifar-10-batches-py/, files without `.bin`) is pickled Python objects:
mmkit never unpickles, so it is refused with a pointer to the binary version.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmkit.data.catalog import CIFAR_CLASSES
from mmkit.data.core import Dataset, standardize_
from mmkit.data.formats.holdout import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, split_with_validation
from mmkit.errors import MmkitError

RECORD_BYTES = 1 + 3 * 32 * 32  # label byte + R, G, B planes
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
BINARY_FOLDER = "cifar-10-batches-bin"  # what the official binary archive extracts to
PICKLED_FOLDER = "cifar-10-batches-py"
PICKLED_FILES = ("data_batch_1", "batches.meta", "test_batch")
PICKLE_PROTOCOL_2_MAGIC = 0x80  # the first byte of each file of the python version
BT601_LUMA = (0.299, 0.587, 0.114)  # R, G, B weights of luma
POINTER = (
    "mmkit never unpickles files; use CIFAR-10's binary version instead "
    "(cifar-10-binary.tar.gz from the CIFAR page, which extracts to cifar-10-batches-bin/ with "
    "data_batch_1.bin … test_batch.bin)"
)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """`[..., 3, H, W]` RGB → `[..., H, W]` luma, BT.601 weights."""
    red, green, blue = rgb.unbind(-3)
    return BT601_LUMA[0] * red + BT601_LUMA[1] * green + BT601_LUMA[2] * blue


def looks_like_cifar10(folder: Path) -> bool:
    """A binary or pickled CIFAR-10 folder, or one that holds either as its subfolder."""
    names = {BINARY_FOLDER, PICKLED_FOLDER, TEST_FILE, *TRAIN_FILES, *PICKLED_FILES}
    return any((folder / name).exists() for name in names)


def _binary_folder(folder: Path) -> Path:
    """The folder that holds the .bin files (SOURCE or its cifar-10-batches-bin/); refuse the pickled version."""
    for candidate in (folder, folder / BINARY_FOLDER):
        if any((candidate / f).is_file() for f in (*TRAIN_FILES, TEST_FILE)):
            return candidate
    for candidate in (folder, folder / PICKLED_FOLDER):
        if any((candidate / f).is_file() for f in PICKLED_FILES):
            raise MmkitError(f"{candidate} is CIFAR-10's pickled \"python version\"; {POINTER}")
    return folder  # the caller names the missing files


def _read_records(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels [n, 3072] and int64 labels [n] of one .bin file."""
    data = path.read_bytes()
    if data[:1] == bytes([PICKLE_PROTOCOL_2_MAGIC]):
        raise MmkitError(f"{path} is pickled (CIFAR-10's python version renamed?); {POINTER}")
    if not data or len(data) % RECORD_BYTES:
        raise MmkitError(
            f"{path}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 records"
        )
    records = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].to(torch.int64)
    if int(labels.max()) >= len(CIFAR_CLASSES):
        raise MmkitError(f"{path}: label byte {int(labels.max())} is outside 0–9; not a CIFAR-10 binary file")
    return records[:, 1:], labels


def _read_classes(folder: Path) -> tuple[str, ...]:
    meta = folder / META_FILE
    if not meta.exists():
        return CIFAR_CLASSES
    names = tuple(line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) != len(CIFAR_CLASSES) or len(set(names)) != len(names):
        raise MmkitError(f"{meta}: expected {len(CIFAR_CLASSES)} distinct class names, one per line; got {len(names)}")
    return names


def read_cifar10(
    folder: Path,
    name: str,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> Dataset:
    """The `Dataset` of a binary CIFAR-10 folder (see the module docstring)."""
    folder = _binary_folder(folder)
    missing = [f for f in (*TRAIN_FILES, TEST_FILE) if not (folder / f).is_file()]
    if missing:
        raise MmkitError(f"{folder}: CIFAR-10 binary files missing: {', '.join(missing)}")
    parts = [_read_records(folder / f) for f in (*TRAIN_FILES, TEST_FILE)]
    pixels = torch.cat([p for p, _ in parts])  # (N, 3072) uint8
    labels = torch.cat([label for _, label in parts])
    n_test = parts[-1][1].shape[0]
    split, split_note = split_with_validation(labels[:-n_test], n_test, val_fraction, split_seed,
                                              "the official test batch", "the five training batches")

    image = pixels.to(torch.float32).div_(255)  # (N, 3072) = C×H×W
    brightness = luma(image.reshape(-1, 3, 32, 32)).reshape(-1, 32 * 32)
    is_train = split == 0
    inputs = {"color": standardize_(image, is_train), "brightness": standardize_(brightness, is_train)}
    notes = (
        f"source: CIFAR-10 binary version, {folder}",
        split_note,
        ("inputs: color [3072] = the pixel bytes in file order (R, G, B planes of 32×32) / 255; "
        "brightness [1024] = luma 0.299 R + 0.587 G + 0.114 B (BT.601); each standardised with "
        "one mean and std from the train split"),
    )
    return Dataset(name, inputs, labels, split, None, _read_classes(folder), notes)
