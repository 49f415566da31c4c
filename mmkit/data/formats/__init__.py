"""Real datasets in their official on-disk formats, read into a `Dataset` (nothing is downloaded).

    ravdess        folder tree of MM-VC-EE-II-SS-RR-AA .wav / .mp4 files  → audio, video
    crema-d        folder tree of ActorID_Sentence_Emotion_Level .wav / .flv → audio, video
    cifar10        the binary version: data_batch_1.bin … test_batch.bin → color, brightness
    fashion-mnist  the four IDX files, gzipped or not                     → image, text

`prepare_source` decodes a folder once (`mmkit data prepare` writes the result as a tensor file,
so training never decodes video again); `load_source_folder` is what `--data FOLDER` calls, for
the small formats only (CIFAR-10 and Fashion-MNIST load in seconds; RAVDESS and CREMA-D need
audio and video decoding, so they are prepared first). Each format's module documents its files,
inputs and split.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mmkit.data.core import Dataset
from mmkit.data.formats.emotion import Announce, Track, no_announcement, no_progress
from mmkit.errors import MmkitError, unknown_choice

FORMATS = {"ravdess": "RAVDESS", "crema-d": "CREMA-D", "cifar10": "CIFAR-10", "fashion-mnist": "Fashion-MNIST"}
SMALL_FORMATS = ("cifar10", "fashion-mnist")  # `--data FOLDER` reads these directly


@dataclass(frozen=True)
class PrepareOptions:
    """Options of `mmkit data prepare`; None means the format's default. Not every format takes all."""

    channel: str | None = None  # RAVDESS vocal channel: speech, song or both
    modalities: tuple[str, ...] | None = None  # audio and/or video; default: those with files
    val_actors: tuple[int, ...] | None = None
    test_actors: tuple[int, ...] | None = None
    sample_rate: int | None = None  # audio features (`LogMelSettings`)
    n_mels: int | None = None
    window_ms: float | None = None
    hop_ms: float | None = None
    audio_seconds: float | None = None
    frames: int | None = None  # video frames (`FrameSettings`)
    frame_size: int | None = None
    crop_scale: float | None = None
    val_fraction: float | None = None  # CIFAR-10, Fashion-MNIST: validation carved out of train
    split_seed: int | None = None

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


AUDIO_OPTIONS = {"sample_rate": "sample_rate", "n_mels": "n_mels", "window_ms": "window_ms", "hop_ms": "hop_ms",
                 "audio_seconds": "seconds"}  # option → LogMelSettings field
VIDEO_OPTIONS = {"frames": "frames", "frame_size": "size", "crop_scale": "crop_scale"}  # → FrameSettings field
EMOTION_OPTIONS = {"modalities", "val_actors", "test_actors", *AUDIO_OPTIONS, *VIDEO_OPTIONS}
IMAGE_OPTIONS = {"val_fraction", "split_seed"}
ACCEPTED_OPTIONS = {
    "ravdess": {"channel", *EMOTION_OPTIONS},
    "crema-d": EMOTION_OPTIONS,
    "cifar10": IMAGE_OPTIONS,
    "fashion-mnist": IMAGE_OPTIONS,
}


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _source_folder(source: str | Path) -> Path:
    folder = Path(source).expanduser()
    if not folder.exists():
        raise MmkitError(f"data folder not found: {source}")
    if not folder.is_dir():
        archive = folder.name.endswith((".tar.gz", ".tgz", ".tar", ".zip"))
        hint = "extract the archive and give the folder it makes" if archive else "give the folder that holds the dataset's files"
        raise MmkitError(f"{source} is not a folder; {hint}")
    return folder


def detect_format(folder: Path) -> str:
    """Which of `FORMATS` the files in `folder` are in; an MmkitError when none."""
    from mmkit.data.formats import cifar10, crema_d, emotion, fashion_mnist, ravdess

    if cifar10.looks_like_cifar10(folder):
        return "cifar10"
    if fashion_mnist.looks_like_fashion_mnist(folder):
        return "fashion-mnist"
    files = emotion.media_files(folder)
    if ravdess.looks_like_ravdess(files):
        return "ravdess"
    if crema_d.looks_like_crema_d(files):
        return "crema-d"
    raise MmkitError(
        f"{folder}: no files of a known format (CIFAR-10 data_batch_N.bin, Fashion-MNIST IDX, RAVDESS "
        f"MM-VC-EE-II-SS-RR-AA, CREMA-D ActorID_Sentence_Emotion_Level); valid formats: {', '.join(FORMATS)}"
    )


def prepare_source(
    source: str | Path,
    fmt: str | None = None,
    options: PrepareOptions | None = None,
    track: Track = no_progress,
    announce: Announce = no_announcement,
    name: str | None = None,
) -> Dataset:
    """Read a dataset folder in format `fmt` (detected when None) into a `Dataset`.

    `track(items, description)` wraps the decoding loop, for a progress bar; `announce(note)` is
    called with each of the dataset's notes that is known before decoding (the split, the features).
    """
    if fmt is not None and fmt not in FORMATS:
        raise unknown_choice("format", fmt, FORMATS)
    folder = _source_folder(source)
    fmt = fmt or detect_format(folder)
    options = options or PrepareOptions()
    given = options.given()
    stray = sorted(set(given) - ACCEPTED_OPTIONS[fmt])
    if stray:
        raise MmkitError(f"{', '.join(option_flag(o) for o in stray)}: not an option of the {fmt} format")
    name = str(source) if name is None else name
    if fmt == "cifar10":
        from mmkit.data.formats.cifar10 import read_cifar10

        return read_cifar10(folder, name, **given)
    if fmt == "fashion-mnist":
        from mmkit.data.formats.fashion_mnist import read_fashion_mnist

        return read_fashion_mnist(folder, name, **given)
    return _prepare_emotion(fmt, folder, name, options, track, announce)


def _prepare_emotion(
    fmt: str, folder: Path, name: str, options: PrepareOptions, track: Track, announce: Announce
) -> Dataset:
    from mmkit.data.audio import LogMelSettings, is_audio_file
    from mmkit.data.formats import crema_d, ravdess
    from mmkit.data.formats.emotion import ActorSplit, build_emotion_dataset, resolve_modalities
    from mmkit.data.video import FrameSettings, require_av

    module: Any = ravdess if fmt == "ravdess" else crema_d
    # every option is checked before the files are read
    split = ActorSplit(options.val_actors or module.DEFAULT_VAL_ACTORS, options.test_actors or module.DEFAULT_TEST_ACTORS)
    given = options.given()
    audio = LogMelSettings(**{field: given[o] for o, field in AUDIO_OPTIONS.items() if o in given})
    frames = FrameSettings(**{field: given[o] for o, field in VIDEO_OPTIONS.items() if o in given})
    if fmt == "ravdess":
        channel = options.channel or ravdess.DEFAULT_CHANNEL
        takes, classes, n_files = ravdess.ravdess_takes(folder, channel)
        source_note = f"source: RAVDESS {channel}, {n_files} files → {len(takes)} takes, {folder}"
    else:
        takes, classes, n_files = crema_d.crema_d_takes(folder)
        source_note = f"source: CREMA-D, {n_files} files → {len(takes)} takes, {folder}"
    modalities = resolve_modalities(options.modalities, takes, folder)
    needs_video_decoder = "video" in modalities or (
        "audio" in modalities and any(t.audio is not None and not is_audio_file(t.audio) for t in takes)
    )
    if needs_video_decoder:
        require_av()  # fail before decoding anything
    return build_emotion_dataset(name, source_note, takes, classes, modalities, split, audio, frames, track, announce)


def load_source_folder(spec: str) -> Dataset:
    """`--data FOLDER`: a CIFAR-10 or Fashion-MNIST folder read as it is; the others say to prepare."""
    folder = _source_folder(spec)
    fmt = detect_format(folder)
    if fmt not in SMALL_FORMATS:
        raise MmkitError(
            f"{spec} is a {FORMATS[fmt]} folder: decode it once with `mmkit data prepare {spec} --format {fmt} "
            f"--out {fmt}.safetensors`, then pass that file to --data"
        )
    return prepare_source(folder, fmt, name=spec)
