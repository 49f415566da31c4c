"""Fashion-MNIST, the official IDX files, gzipped (as distributed) or not.

Files: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
`t10k-labels-idx1-ubyte`, each optionally with `.gz`. An IDX file is a big-endian header —
two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions — then one
big-endian uint32 per dimension, then the data, row-major: magic 0x00000803 for images
[N, 28, 28], 0x00000801 for labels [N].

Inputs, as `synthetic-fashion` has them (what `clip` and `fusion` read):
    image  [1, 28, 28]  pixels / 255, standardised with one mean and std from the train split
    text   [32]         token ids of a prompt: "a photo of a {class name}" (`CLASS_PROMPTS`) for
                        training samples; `NEUTRAL_PROMPT` for validation and test samples, so that
                        no evaluation can read the answer from the text (`fusion` reads it)

Fashion-MNIST has no validation split: a seeded, stratified `val_fraction` of the training set
(default 10 %, seed 0 → 54,000 / 6,000 / 10,000) is set aside as validation.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import torch

from mmkit.data.catalog import CAPTION_CONTEXT_LENGTH, CLASS_PROMPTS, FASHION_CLASSES
from mmkit.data.core import Dataset, standardize_
from mmkit.data.formats.holdout import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, split_with_validation
from mmkit.data.tokenizer import encode_batch
from mmkit.errors import MmkitError

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
FILES = {  # (split, kind) → official file name, without .gz
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
NEUTRAL_PROMPT = "a photo of a fashion item"  # names no class


def looks_like_fashion_mnist(folder: Path) -> bool:
    return any((folder / name).exists() or (folder / f"{name}.gz").exists() for name in FILES.values())


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise MmkitError(
        f"{folder}: Fashion-MNIST file {name} (or {name}.gz) not found; expected the four official IDX files "
        f"{', '.join(FILES.values())}"
    )


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """uint8 tensor of an IDX file (gzipped or not) whose magic number must be `magic`."""
    data = path.read_bytes()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise MmkitError(f"{path}: not a readable gzip file ({exc})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != IDX_UBYTE:
        raise MmkitError(f"{path}: not an unsigned-byte IDX file (header {data[:4].hex()})")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise MmkitError(f"{path}: IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MmkitError(f"{path}: IDX header cut short")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise MmkitError(f"{path}: IDX dimensions {list(dims)} need {math.prod(dims)} bytes of data, found {len(data) - header}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def _read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(_find(folder, FILES[split, "images"]), IDX_IMAGES_MAGIC)  # (n, 28, 28)
    labels_path = _find(folder, FILES[split, "labels"])
    labels = read_idx(labels_path, IDX_LABELS_MAGIC).to(torch.int64)  # (n,)
    if images.shape[0] != labels.shape[0]:
        raise MmkitError(f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) >= len(FASHION_CLASSES):
        raise MmkitError(f"{labels_path}: label {int(labels.max())} is outside 0–9")
    return images, labels


def read_fashion_mnist(
    folder: Path,
    name: str,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> Dataset:
    """The `Dataset` of a folder holding the four IDX files (see the module docstring)."""
    train_images, train_labels = _read_split(folder, "train")
    test_images, test_labels = _read_split(folder, "test")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise MmkitError(f"{folder}: train images are {list(train_images.shape[1:])}, test images {list(test_images.shape[1:])}")
    labels = torch.cat([train_labels, test_labels])
    split, split_note = split_with_validation(train_labels, test_labels.shape[0], val_fraction, split_seed,
                                              "the official t10k set", "the training set")

    image = torch.cat([train_images, test_images]).to(torch.float32).div_(255)[:, None]  # (N, 1, H, W)
    prompts = encode_batch([*CLASS_PROMPTS, NEUTRAL_PROMPT], CAPTION_CONTEXT_LENGTH)  # (11, 32)
    text = torch.where((split == 0)[:, None], prompts[labels], prompts[len(CLASS_PROMPTS)])  # (N, 32)
    inputs = {"image": standardize_(image, split == 0), "text": text}
    notes = (
        f"source: Fashion-MNIST IDX files, {folder}",
        split_note,
        ("inputs: image [1, 28, 28] = pixels / 255, standardised with one mean and std from the train split; "
        f"text = the class prompt \"a photo of a {{class}}\" for training samples and \"{NEUTRAL_PROMPT}\" "
        "for validation and test samples, so that no evaluation reads the answer from the text"),
    )
    return Dataset(name, inputs, labels, split, None, FASHION_CLASSES, notes)
