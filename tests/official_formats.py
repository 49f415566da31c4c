"""Tiny files in the official on-disk formats, written by the tests themselves: WAV tones, MP4 and
FLV videos (PyAV), RAVDESS and CREMA-D trees, CIFAR-10 binary batches, Fashion-MNIST IDX files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mmkit.data.catalog import CIFAR_CLASSES

# one tone per emotion, low to high: the prepared audio's loudest mel band must rise with the label
TONES_HZ = (300, 500, 800, 1200, 1800, 2600, 3600, 5000)


def write_tone_wav(path: Path, hz: float, rate: int = 48_000, channels: int = 2, seconds: float = 0.6) -> None:
    """A 16-bit PCM tone; in stereo the right channel is quieter, so the downmix is their mean."""
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * hz * t)
    data = np.stack([tone * (1.0 - 0.5 * c) for c in range(channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), data, rate, subtype="PCM_16")


def write_video(
    path: Path, levels: list[tuple[int, int, int]], width: int = 32, height: int = 24,
    tone_hz: float | None = None, codec: str = "libx264",
) -> None:
    """One frame per RGB level, 25 fps; with `tone_hz`, an AAC audio track of that tone (48 kHz stereo)."""
    av = pytest.importorskip("av")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        audio = None
        if tone_hz is not None:
            audio = container.add_stream("aac", rate=48_000)
            audio.layout = "stereo"
        for level in levels:
            image = np.empty((height, width, 3), np.uint8)
            image[:] = level
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            t = np.arange(int(48_000 * 0.6)) / 48_000
            wave = np.repeat((0.5 * np.sin(2 * np.pi * tone_hz * t))[None], 2, 0).astype(np.float32)
            for start in range(0, wave.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start : start + 1024]),
                                                   format="fltp", layout="stereo")
                frame.sample_rate = 48_000
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)


def ravdess_name(modality: int, emotion: int, actor: int, channel: int = 1, suffix: str = ".wav") -> str:
    return f"{modality:02d}-{channel:02d}-{emotion:02d}-01-01-01-{actor:02d}{suffix}"


def write_ravdess_tree(root: Path, video: bool) -> Path:
    """Actors 1–4, one speech take per emotion, plus a song take that `--channel speech` skips.

    Actors 1–3: audio-only WAV (03; actor 2 at 22.05 kHz mono, the others 48 kHz stereo) and, with
    `video`, a video-only MP4 (02). Actor 4 (with `video`): full-AV MP4s (01) only, so its audio
    comes from the MP4's audio track. Video frames are grey at a level that rises with the emotion.
    """
    for actor in (1, 2, 3):
        for emotion in range(1, 9):
            rate, channels = (22_050, 1) if actor == 2 else (48_000, 2)
            folder = root / "Audio_Speech_Actors_01-24" / f"Actor_{actor:02d}"
            write_tone_wav(folder / ravdess_name(3, emotion, actor), TONES_HZ[emotion - 1], rate, channels)
            if video:
                grey = [(20 * emotion,) * 3] * 6
                write_video(root / f"Video_Speech_Actor_{actor:02d}" / ravdess_name(2, emotion, actor, suffix=".mp4"), grey)
        write_tone_wav(root / "Audio_Song_Actors_01-24" / ravdess_name(3, 1, actor, channel=2), 440.0)
    if video:
        for emotion in range(1, 9):
            grey = [(20 * emotion,) * 3] * 6
            write_video(root / "Video_Speech_Actor_04" / ravdess_name(1, emotion, 4, suffix=".mp4"), grey,
                        tone_hz=TONES_HZ[emotion - 1])
    else:
        for emotion in range(1, 9):
            write_tone_wav(root / "Audio_Speech_Actors_01-24" / "Actor_04" / ravdess_name(3, emotion, 4),
                           TONES_HZ[emotion - 1])
    (root / ".DS_Store").write_bytes(b"\0")  # hidden files are not read
    return root


CREMA_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def write_crema_d_tree(root: Path, with_video: bool = False) -> Path:
    """Actors 1001–1004 × the 6 emotions, 16 kHz mono WAVs in AudioWAV/; FLVs for actors 1001–1003."""
    for actor in (1001, 1002, 1003, 1004):
        for i, emotion in enumerate(CREMA_EMOTIONS):
            stem = f"{actor}_DFA_{emotion}_{'XX' if emotion == 'NEU' else 'HI'}"
            write_tone_wav(root / "AudioWAV" / f"{stem}.wav", TONES_HZ[i], rate=16_000, channels=1)
            if with_video and actor != 1004:
                write_video(root / "VideoFlash" / f"{stem}.flv", [(30 * (i + 1),) * 3] * 5, codec="flv")
    return root


def write_cifar10(root: Path, per_file: int = 20, pickled: bool = False) -> Path:
    """The binary version: label byte + R, G, B planes; every pixel is random, labels cycle 0–9."""
    generator = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.arange(per_file) % 10
        pixels = generator.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        records = np.concatenate([labels[:, None].astype(np.uint8), pixels], axis=1)
        if pickled:  # the python version's files start with the pickle protocol-2 opcode
            (root / name).write_bytes(b"\x80\x02}q\x00" + records.tobytes())
        else:
            (root / f"{name}.bin").write_bytes(records.tobytes())
    meta = "batches.meta" if pickled else "batches.meta.txt"
    (root / meta).write_text("\n".join(CIFAR_CLASSES) + "\n\n")
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_fashion_mnist(root: Path, gz: bool, n_train: int = 30, n_test: int = 10) -> Path:
    """The four IDX files; image i of class c is filled with the value 20·c + 5."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.broadcast_to((20 * labels + 5)[:, None, None], (n, 28, 28))
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(np.asarray(array))
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root
