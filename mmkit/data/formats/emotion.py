"""What RAVDESS and CREMA-D share: takes, actor-independent splits, decoding into a `Dataset`.

A *take* is one recorded performance: an actor, an emotion, and the files that hold its audio
(a WAV, or the audio track of a full audio-visual video) and its video. Each format's module
turns file names into takes; `build_emotion_dataset` decodes them once:

    audio  [frames, n_mels]       log-mel (`mmkit.data.audio`), standardised on the train split
    video  [frames, 3, size, size] centre-cropped frames (`mmkit.data.video`) / 255, standardised
    group  the actor of each take; label = the emotion's position in the class list

Splits are by actor, never by take: the validation and test actors are given explicitly, every
other actor trains, and no actor is in two splits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from mmkit.data.audio import WAV_SUFFIXES, LogMelSettings, log_mel_features
from mmkit.data.core import SPLIT_CODES, Dataset, standardize_
from mmkit.data.video import VIDEO_SUFFIXES, FrameSettings, read_video_frames
from mmkit.errors import MmkitError

T = TypeVar("T")
Track = Callable[[Sequence[T], str], Iterable[T]]  # wraps a sequence with a progress display
Announce = Callable[[str], None]  # shows a note as soon as it is known (the split, before decoding)
MODALITIES = ("audio", "video")
MEDIA_SUFFIXES = WAV_SUFFIXES + VIDEO_SUFFIXES
IGNORED_FOLDERS = ("__MACOSX",)  # macOS archive metadata


def no_progress(items: Sequence[T], description: str) -> Iterable[T]:
    return items


def no_announcement(note: str) -> None:
    return None


@dataclass(frozen=True)
class Take:
    actor: int
    label: int
    audio: Path | None  # a WAV, or a video file whose audio track is used
    video: Path | None


def media_files(folder: Path) -> list[Path]:
    """Audio and video files below `folder`, sorted; hidden files and macOS metadata skipped."""
    if not folder.exists():
        raise MmkitError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise MmkitError(f"{folder} is not a folder")
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") or part in IGNORED_FOLDERS for part in relative):
            continue
        if path.suffix.lower() in MEDIA_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# actor-independent splits

_ACTOR_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_actors(text: str, option: str = "actors") -> tuple[int, ...]:
    """`"21-24"` or `"1,3,5-7"` → sorted actor ids."""
    actors: set[int] = set()
    for part in text.split(","):
        match = _ACTOR_RANGE.match(part)
        if not match:
            raise MmkitError(f"{option}: {text!r} is not a list of actor ids or ranges such as 21-24 or 1,3,5-7")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if last < first:
            raise MmkitError(f"{option}: range {part.strip()!r} runs backwards")
        actors.update(range(first, last + 1))
    return tuple(sorted(actors))


def format_actors(actors: Iterable[int]) -> str:
    """(1, 2, 3, 4, 7) → '1–4, 7'."""
    ordered = sorted(set(actors))
    runs: list[list[int]] = []
    for actor in ordered:
        if runs and actor == runs[-1][-1] + 1:
            runs[-1].append(actor)
        else:
            runs.append([actor])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs) or "none"


@dataclass(frozen=True)
class ActorSplit:
    """Validation and test actors; every other actor is in the training split."""

    val: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.val or not self.test:
            raise MmkitError("the validation and test splits each need at least one actor")
        both = sorted(set(self.val) & set(self.test))
        if both:
            raise MmkitError(f"actor {format_actors(both)} is in both the validation and the test actors; "
                             "an actor may be in one split only")

    def codes(self, actors: torch.Tensor) -> torch.Tensor:
        """uint8 split code per actor id (0 train, 1 val, 2 test)."""
        split = torch.full(actors.shape, SPLIT_CODES["train"], dtype=torch.uint8)
        split[torch.isin(actors, torch.tensor(self.val))] = SPLIT_CODES["val"]
        split[torch.isin(actors, torch.tensor(self.test))] = SPLIT_CODES["test"]
        return split

    def describe(self, present: Iterable[int]) -> str:
        present = set(present)
        train = present - set(self.val) - set(self.test)
        return (f"actor-independent split: test actors {format_actors(self.test)}; validation actors "
                f"{format_actors(self.val)}; training actors {format_actors(train)} (every other actor found)")


# ---------------------------------------------------------------------------------------------
# decoding


def resolve_modalities(requested: Sequence[str] | None, takes: Sequence[Take], source: Path) -> tuple[str, ...]:
    """`requested` checked, or by default every modality that some take has a file for."""
    if requested:
        unknown = sorted(set(requested) - set(MODALITIES))
        if unknown:
            raise MmkitError(f"unknown modality {unknown[0]!r}; valid: {', '.join(MODALITIES)}")
        chosen = tuple(m for m in MODALITIES if m in requested)
    else:
        chosen = tuple(m for m in MODALITIES if any(getattr(t, m) is not None for t in takes))
    for modality in chosen:
        if not any(getattr(t, modality) is not None for t in takes):
            raise MmkitError(f"{source}: no {modality} files for any take; choose --modalities "
                             f"{','.join(m for m in MODALITIES if m != modality)}")
    return chosen


def build_emotion_dataset(
    name: str,
    source_note: str,
    takes: Sequence[Take],
    classes: tuple[str, ...],
    modalities: tuple[str, ...],
    actor_split: ActorSplit,
    audio_settings: LogMelSettings,
    frame_settings: FrameSettings,
    track: Track = no_progress,
    announce: Announce = no_announcement,
) -> Dataset:
    """Decode every take that has all `modalities` (see the module docstring).

    The notes that do not depend on the decoded data (source, split, features) are announced
    before decoding starts.
    """
    usable = [t for t in takes if all(getattr(t, m) is not None for m in modalities)]
    if not usable:
        raise MmkitError(f"no take has a file for each of {', '.join(modalities)}")
    actors = torch.tensor([t.actor for t in usable], dtype=torch.int64)
    split = actor_split.codes(actors)
    present = set(actors.tolist())
    for split_name in ("train", "val", "test"):
        if not (split == SPLIT_CODES[split_name]).any():
            raise MmkitError(
                f"no takes in the {split_name} split: {actor_split.describe(present)}; actors found: "
                f"{format_actors(present)} (choose them with --val-actors / --test-actors)"
            )
    notes = [source_note, actor_split.describe(present)]
    if len(usable) < len(takes):
        notes.append(f"{len(takes) - len(usable)} of {len(takes)} takes skipped for lacking a file "
                     f"for {' or '.join(modalities)}")
    notes += [settings.describe() for settings, modality in ((audio_settings, "audio"), (frame_settings, "video"))
              if modality in modalities]
    notes.append("each input standardised with one mean and std from the train split; group = actor")
    for note in notes:
        announce(note)

    audio, video = [], []
    for take in track(usable, f"decoding {len(usable)} takes"):
        if "audio" in modalities:
            audio.append(log_mel_features(take.audio, audio_settings))  # (frames, n_mels)
        if "video" in modalities:
            video.append(read_video_frames(take.video, frame_settings))  # (T, 3, S, S) uint8
    train = split == SPLIT_CODES["train"]
    inputs = {}
    if audio:
        inputs["audio"] = standardize_(torch.stack(audio), train)  # (N, frames, n_mels)
    if video:
        inputs["video"] = standardize_(torch.stack(video).to(torch.float32).div_(255), train)  # (N, T, 3, S, S)
    labels = torch.tensor([t.label for t in usable], dtype=torch.int64)
    return Dataset(name, inputs, labels, split, actors, classes, tuple(notes))
