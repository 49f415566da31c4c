"""Video decoding through PyAV (FFmpeg), from the optional extra: `pip install 'mmkit-cli[video]'`.

    file → every frame decoded (FFmpeg's own threads) → scaled so the crop is `size` pixels
         → the centre square crop (the face region: RAVDESS and CREMA-D film one actor, centred,
           facing the camera; no face detector is run) → `frames` of them, uniformly spread
         → uint8 [frames, 3, size, size]

Uniform sampling: the clip's N frames are cut into `frames` equal segments and the middle frame
of each is kept (frame ⌊(k + ½) · N / frames⌋ for k = 0 … frames − 1); a clip shorter than
`frames` repeats frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mmkit.errors import MmkitError

VIDEO_SUFFIXES = (".mp4", ".flv", ".avi", ".mov", ".mkv", ".webm")
INSTALL_HINT = "pip install 'mmkit-cli[video]'"


@dataclass(frozen=True)
class FrameSettings:
    """What `read_video_frames` returns; the defaults give lfm2's default `video` [16, 3, 64, 64]."""

    frames: int = 16
    size: int = 64  # output height = width, pixels
    crop_scale: float = 1.0  # side of the centre square as a fraction of the frame's shorter side

    def __post_init__(self) -> None:
        if self.frames < 1 or self.size < 1:
            raise MmkitError(f"video frames and frame size must be positive, got {self.frames} and {self.size}")
        if not 0 < self.crop_scale <= 1:
            raise MmkitError(f"crop scale must be in (0, 1], got {self.crop_scale}")

    def describe(self) -> str:
        return (
            f"video: {self.frames} frames spread uniformly over each clip; face region = the centre "
            f"square of {self.crop_scale:g} × the shorter side (a centre crop, no face detection), "
            f"resized to {self.size}×{self.size} RGB → [{self.frames}, 3, {self.size}, {self.size}]"
        )


def require_av() -> ModuleType:
    """The `av` module, or a one-line error saying how to install it."""
    try:
        import av
    except ImportError:
        raise MmkitError(f"reading video needs PyAV, which is not installed: {INSTALL_HINT}") from None
    return av


def _open(path: Path) -> Any:
    av = require_av()
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise MmkitError(f"cannot read video file {path}: {exc}") from None


def uniform_frame_indices(total: int, frames: int) -> torch.Tensor:
    """The middle frame of each of `frames` equal segments of `total` frames (int64 [frames])."""
    return ((torch.arange(frames, dtype=torch.float64) + 0.5) * total / frames).floor().to(torch.int64)


def centre_crop_size(width: int, height: int, settings: FrameSettings) -> tuple[int, int]:
    """The (width, height) to scale a frame to, so that its centre square crop is `size` pixels."""
    scale = settings.size / (settings.crop_scale * min(width, height))
    return max(settings.size, round(width * scale)), max(settings.size, round(height * scale))


def read_video_frames(path: Path, settings: FrameSettings) -> torch.Tensor:
    """uint8 `[frames, 3, size, size]` (see the module docstring).

    When the container states its frame count, only the picked frames are scaled and cropped
    (a third of the time for a RAVDESS clip); when it does not, or states it wrongly, every frame
    is scaled down and the picks are made afterwards.
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        if stream.frames > 0:
            wanted = uniform_frame_indices(stream.frames, settings.frames).tolist()
            kept, decoded = _decode_crops(container, stream, path, settings, set(wanted))
            if decoded == stream.frames:  # the stated count was right
                return torch.stack([kept[i] for i in wanted]).permute(0, 3, 1, 2).contiguous()
    with _open(path) as container:
        kept, decoded = _decode_crops(container, _video_stream(container, path), path, settings, None)
    if not decoded:
        raise MmkitError(f"video file {path} has no frames")
    picked = torch.stack([kept[i] for i in uniform_frame_indices(decoded, settings.frames).tolist()])
    return picked.permute(0, 3, 1, 2).contiguous()  # (T, S, S, 3) → (T, 3, S, S)


def _video_stream(container: Any, path: Path) -> Any:
    if not container.streams.video:
        raise MmkitError(f"video file {path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg decodes on all cores
    return stream


def _decode_crops(
    container: Any, stream: Any, path: Path, settings: FrameSettings, wanted: set[int] | None
) -> tuple[dict[int, torch.Tensor], int]:
    """Frame index → uint8 `[size, size, 3]` centre crop for the `wanted` frames (None: all), and
    how many frames the stream has."""
    av = require_av()
    crops, index = {}, -1
    try:
        for index, frame in enumerate(container.decode(stream)):
            if wanted is not None and index not in wanted:
                continue
            width, height = centre_crop_size(frame.width, frame.height, settings)
            rgb = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()  # (H', W', 3)
            top, left = (height - settings.size) // 2, (width - settings.size) // 2
            crops[index] = torch.from_numpy(rgb[top : top + settings.size, left : left + settings.size].copy())
    except av.FFmpegError as exc:
        raise MmkitError(f"cannot decode video file {path}: {exc}") from None
    return crops, index + 1


def read_audio_track(path: Path) -> tuple[torch.Tensor, int]:
    """float32 `[channels, samples]` and the sample rate of a video file's first audio stream."""
    av = require_av()
    chunks = []
    with _open(path) as container:
        if not container.streams.audio:
            raise MmkitError(f"video file {path} has no audio stream")
        stream = container.streams.audio[0]
        to_planar_float = av.AudioResampler(format="fltp")  # any sample format → float planes
        try:
            for frame in container.decode(stream):
                chunks.extend(f.to_ndarray() for f in to_planar_float.resample(frame))
            chunks.extend(f.to_ndarray() for f in to_planar_float.resample(None))  # flush
        except av.FFmpegError as exc:
            raise MmkitError(f"cannot decode the audio of {path}: {exc}") from None
        rate = stream.rate
    if not chunks:
        raise MmkitError(f"video file {path} has no audio samples")
    return torch.cat([torch.from_numpy(c) for c in chunks], dim=1).to(torch.float32), int(rate)
