"""RAVDESS: a folder tree of the official files (Audio_Speech_Actors_01-24/, Video_Speech_Actor_NN/, ...).

File names are `MM-VC-EE-II-SS-RR-AA` + `.wav` or `.mp4`:
    MM  modality       01 full audio-visual (.mp4), 02 video-only (.mp4), 03 audio-only (.wav)
    VC  vocal channel  01 speech, 02 song
    EE  emotion        01 neutral, 02 calm, 03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust,
                       08 surprised
    II  intensity      01 normal, 02 strong      SS  statement  01, 02
    RR  repetition     01, 02                    AA  actor      01–24 (odd male, even female)

One take = one (vocal channel, emotion, intensity, statement, repetition, actor). Its audio is the
audio-only WAV (03), else the audio track of the full-AV video (01); its video is the full-AV
video (01), else the video-only one (02) — the two are the same recording, so a take is one
sample, not two. Classes are the emotions present, in RAVDESS's order (all 8 in speech; song has
no disgust or surprised), so label = the emotion's rank among them.

Default split, actor-independent as in the literature: test actors 21–24, validation 17–20,
training 1–16 (speech: 960 / 240 / 240 takes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mmkit.data.audio import is_audio_file
from mmkit.data.catalog import RAVDESS_EMOTIONS
from mmkit.data.formats.emotion import Take, media_files
from mmkit.errors import MmkitError

NAME_PATTERN = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
FULL_AV, VIDEO_ONLY, AUDIO_ONLY = 1, 2, 3
CHANNELS = {"speech": (1,), "song": (2,), "both": (1, 2)}
DEFAULT_CHANNEL = "speech"
DEFAULT_VAL_ACTORS = (17, 18, 19, 20)
DEFAULT_TEST_ACTORS = (21, 22, 23, 24)
FIELD_RANGES = (  # (field, lowest, highest), in file-name order
    ("modality", 1, 3), ("vocal channel", 1, 2), ("emotion", 1, 8), ("intensity", 1, 2),
    ("statement", 1, 2), ("repetition", 1, 2), ("actor", 1, 24),
)


@dataclass(frozen=True)
class RavdessName:
    modality: int
    channel: int
    emotion: int  # 1–8, RAVDESS_EMOTIONS[emotion - 1]
    intensity: int
    statement: int
    repetition: int
    actor: int

    @property
    def take(self) -> tuple[int, ...]:
        return (self.channel, self.emotion, self.intensity, self.statement, self.repetition, self.actor)


def parse_ravdess_name(path: Path) -> RavdessName:
    """The seven fields of a RAVDESS file name; an MmkitError naming the file when it does not parse."""
    match = NAME_PATTERN.match(path.stem)
    if not match:
        raise MmkitError(f"{path.name}: not a RAVDESS file name (expected MM-VC-EE-II-SS-RR-AA, e.g. 03-01-05-01-02-01-12.wav)")
    values = tuple(int(group) for group in match.groups())
    for (field, low, high), value in zip(FIELD_RANGES, values, strict=True):
        if not low <= value <= high:
            raise MmkitError(f"{path.name}: RAVDESS {field} {value:02d} is outside {low:02d}–{high:02d}")
    name = RavdessName(*values)
    if is_audio_file(path) != (name.modality == AUDIO_ONLY):
        rule = "an audio file must be modality 03" if is_audio_file(path) else "modality 03 must be an audio file"
        raise MmkitError(f"{path.name}: modality {name.modality:02d} does not fit a {path.suffix} file ({rule})")
    return name


def looks_like_ravdess(files: list[Path]) -> bool:
    return any(NAME_PATTERN.match(path.stem) for path in files)


def ravdess_takes(folder: Path, channel: str) -> tuple[list[Take], tuple[str, ...], int]:
    """The takes of `channel` (speech, song or both), the classes, and how many files were read."""
    if channel not in CHANNELS:
        raise MmkitError(f"unknown vocal channel {channel!r}; valid: {', '.join(CHANNELS)}")
    files = media_files(folder)
    if not files:
        raise MmkitError(f"{folder}: no RAVDESS files (MM-VC-EE-II-SS-RR-AA.wav / .mp4) found")
    by_take: dict[tuple[int, ...], dict[int, Path]] = {}
    for path in files:
        name = parse_ravdess_name(path)
        if name.channel not in CHANNELS[channel]:
            continue
        entry = by_take.setdefault(name.take, {})
        if name.modality in entry:
            raise MmkitError(f"two files for one RAVDESS take: {entry[name.modality]} and {path}")
        entry[name.modality] = path
    if not by_take:
        raise MmkitError(f"{folder}: no RAVDESS {channel} files (vocal channel {', '.join(f'{c:02d}' for c in CHANNELS[channel])})")
    emotions = sorted({take[1] for take in by_take})
    classes = tuple(RAVDESS_EMOTIONS[e - 1] for e in emotions)
    takes = []
    for key in sorted(by_take, key=lambda k: (k[-1], *k[:-1])):  # by actor, then the name's order
        files_of = by_take[key]
        takes.append(Take(
            actor=key[-1],
            label=emotions.index(key[1]),
            audio=files_of.get(AUDIO_ONLY) or files_of.get(FULL_AV),
            video=files_of.get(FULL_AV) or files_of.get(VIDEO_ONLY),
        ))
    return takes, classes, sum(len(v) for v in by_take.values())
