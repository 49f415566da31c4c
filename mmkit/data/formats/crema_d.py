"""CREMA-D: the official folders (AudioWAV/, and VideoFlash/ when present), or any tree of its files.

File names are `ActorID_Sentence_Emotion_Level` + `.wav` (audio) or a video suffix (`.flv` as
distributed, or `.mp4`), e.g. `1001_DFA_ANG_XX.wav`:
    ActorID   1001–1091 (91 actors)
    Sentence  one of the 12 sentence codes (IEO, TIE, IOM, IWW, TAI, MTI, IWL, ITH, DFA, ITS, TSI, WSI)
    Emotion   ANG, DIS, FEA, HAP, NEU, SAD → angry, disgust, fearful, happy, neutral, sad
    Level     LO, MD, HI, or XX (unspecified)
A take's audio is its WAV; its video the video file of the same name, when there is one. Other
files (the AudioMP3/ copies, spreadsheets) are not read. Classes are the emotions present, in
the order above.

Default split, actor-independent: test actors 1082–1091 (10), validation 1073–1081 (9),
training the other 72.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmkit.data.audio import is_audio_file
from mmkit.data.formats.emotion import Take, media_files
from mmkit.errors import MmkitError

NAME_PATTERN = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
LEVELS = ("LO", "MD", "HI", "XX")
DEFAULT_VAL_ACTORS = tuple(range(1073, 1082))
DEFAULT_TEST_ACTORS = tuple(range(1082, 1092))


def parse_crema_d_name(path: Path) -> tuple[int, str, str, str]:
    """(actor, sentence, emotion code, level); an MmkitError naming the file when it does not parse."""
    match = NAME_PATTERN.match(path.stem)
    if not match:
        raise MmkitError(f"{path.name}: not a CREMA-D file name (expected ActorID_Sentence_Emotion_Level, e.g. 1001_DFA_ANG_XX.wav)")
    actor, sentence, emotion, level = match.groups()
    for field, value, valid in (("sentence", sentence, SENTENCES), ("emotion", emotion, EMOTIONS), ("level", level, LEVELS)):
        if value not in valid:
            raise MmkitError(f"{path.name}: unknown CREMA-D {field} {value!r}; valid: {', '.join(valid)}")
    return int(actor), sentence, emotion, level


def looks_like_crema_d(files: list[Path]) -> bool:
    return any(NAME_PATTERN.match(path.stem) for path in files)


def crema_d_takes(folder: Path) -> tuple[list[Take], tuple[str, ...], int]:
    """The takes, the classes, and how many files were read."""
    files = media_files(folder)
    if not files:
        raise MmkitError(f"{folder}: no CREMA-D files (ActorID_Sentence_Emotion_Level.wav / .flv / .mp4) found")
    by_take: dict[str, dict[str, Path]] = {}
    for path in files:
        parse_crema_d_name(path)
        kind = "audio" if is_audio_file(path) else "video"
        entry = by_take.setdefault(path.stem, {})
        if kind in entry:
            raise MmkitError(f"two {kind} files for one CREMA-D take: {entry[kind]} and {path}")
        entry[kind] = path
    names = {stem: parse_crema_d_name(Path(stem)) for stem in by_take}
    codes = [code for code in EMOTIONS if any(name[2] == code for name in names.values())]
    classes = tuple(EMOTIONS[code] for code in codes)
    takes = [
        Take(actor=names[stem][0], label=codes.index(names[stem][2]),
             audio=by_take[stem].get("audio"), video=by_take[stem].get("video"))
        for stem in sorted(by_take, key=lambda s: (names[s][0], s))
    ]
    return takes, classes, len(files)
