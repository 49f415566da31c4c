"""The built-in datasets by name: split sizes and classes, known without generating any data.

The planner needs the number of training samples to turn a step time into an epoch time, and the
input shapes to size the model as `train` will; the generators themselves live beside this file
(a test checks that what they generate matches these entries).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmkit.errors import unknown_choice

RAVDESS_EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# the training captions of synthetic-fashion and of Fashion-MNIST read through mmkit.data.formats
CLASS_PROMPTS: tuple[str, ...] = tuple(f"a photo of a {name}" for name in FASHION_CLASSES)
CAPTION_CONTEXT_LENGTH = 32  # the clip/fusion models' default context_length


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    train: int
    val: int
    test: int
    classes: tuple[str, ...]
    inputs: tuple[tuple[str, tuple[int, ...]], ...]  # (tensor name, per-sample shape), as generated


BUILTIN_DATASETS = {
    "synthetic-cifar": DatasetInfo("synthetic-cifar", 5000, 1000, 1000, CIFAR_CLASSES,
                                   (("color", (3072,)), ("brightness", (1024,)))),
    "synthetic-av": DatasetInfo("synthetic-av", 1920, 480, 480, RAVDESS_EMOTIONS,  # RAVDESS's split sizes
                                (("audio", (64, 40)), ("video", (8, 3, 24, 24)))),
    "synthetic-fashion": DatasetInfo("synthetic-fashion", 6000, 1000, 1000, FASHION_CLASSES,
                                     (("image", (1, 28, 28)), ("text", (32,)))),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in BUILTIN_DATASETS:
        raise unknown_choice("dataset", name, BUILTIN_DATASETS)
    return BUILTIN_DATASETS[name]
