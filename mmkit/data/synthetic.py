"""The three built-in procedural datasets: deterministic from a seed, no download, learnable but
not trivial. Each generator draws everything from one `torch.Generator`, is vectorised over
samples and runs on one thread (about a second each; see `_one_thread`).

Every float input is standardised to zero mean and unit variance with one mean and one standard
deviation per input, measured on the train split (so `color` and `brightness`, say, each have
their own pair). Labels are balanced within each split except in `synthetic-av`, and samples are
shuffled within each split.

`synthetic-cifar` — 10 classes (CIFAR-10's names, nothing CIFAR-like about their looks), 32×32
    colour images, 5000/1000/1000 train/val/test. One object per image on a two-colour gradient
    background with three random coloured blobs (clutter) and pixel noise; the object's position
    (±2 px), size (radius 7–10 px), rotation (±0.25 rad), saturation and value are random.
      colour classes  airplane/automobile: disk, blue vs red;  bird/cat: ring, green vs orange;
                      ship/truck: cross, cyan vs magenta (same shape, hue differs, ±0.05 jitter)
      shape classes   deer: striped square, dog: checkered square, frog: triangle, horse: solid
                      square — each in any hue (same colour distribution, shape differs)
    Inputs: `color` [3072] = the image flattened C×H×W; `brightness` [1024] = its luma
    0.299 R + 0.587 G + 0.114 B, flattened (both from the [0, 1] image, then standardised).
    So the brightness stream sees shapes but cannot tell the colour pairs apart.

`synthetic-av` — the 8 RAVDESS emotions, 24 actors × 120 clips, actor-independent split (train
    actors 1–16, val 17–20, test 21–24 → 1920/480/480), `groups` = actor id (1–24). Per actor:
    8 neutral clips and 16 of each other emotion (neutral is half as frequent, as in RAVDESS
    speech, so UAR ≠ WAR); half of the non-neutral clips are "strong", the rest "normal" (cues at
    60 %), and every actor has their own expressiveness.
      `audio` [64, 40]: log-mel frames (64 frames ≈ 3.2 s at a 50 ms hop; 40 mel bins, 60 Hz–4 kHz)
          of a harmonic source at pitch f0(t) shaped by three formants, a spectral tilt, syllable
          bursts, a noise floor and noise. Per actor: base pitch (odd actors male ~120 Hz, even
          female ~210 Hz), formant scale, loudness, speaking rate. Per clip: recording level
          (±4 dB, so loudness alone is unreliable), prosody noise, vowel colour, noise floor.
      `video` [8, 3, 24, 24]: 8 RGB frames of a schematic face (eyes, brows, mouth, nose
          wrinkles) whose expression ramps in from a random onset; the mouth opens in step with
          the audio's syllables. Per actor: skin tone, face position and size. Per clip: where
          the face sits in the frame (±2.5 px), head drift, lighting, background colour.
    Emotion cues (beyond neutral):
      mainly audio  calm (quieter, slower, falling, steeper tilt; face ≈ neutral);
                    fearful vs surprised (faces alike: open mouth, raised brows; audio: pitch
                    tremolo and fast speech vs an early pitch peak)
      mainly video  disgust (nose wrinkles, lowered brows, frown; voice ≈ neutral)
      both          happy (rising pitch, louder, smile), sad (falling pitch, quiet, frown,
                    inner brows up), angry (loud, flat tilt, lowered and knitted brows)

`synthetic-fashion` — 10 classes (Fashion-MNIST's names), 6000/1000/1000: `image` [1, 28, 28]
    silhouettes built from a few trapezoids (torso, sleeves, legs, sole, handle, cut-outs such as
    a neck line or a coat's opening), with one or two variants per class (a shirt has long or
    short sleeves, a bag a handle or a flap, ...), each part jittered per sample, then scaled
    (0.78–1.12 per axis), rotated (±0.15 rad), translated (±3.5 px), given a random brightness and
    a striped texture, and noise. Shirt is deliberately close to pullover and t-shirt, as in
    Fashion-MNIST.
    `text` [32]: byte-level token ids (`mmkit.data.tokenizer.encode_batch(captions, 32)`) of a
    short caption such as "navy ribbed wool item" or "beige canvas sneaker, summer".
    LABEL LEAKAGE GUARD: a caption is NOT a function of the label. Its colour, pattern, material
    and season words are drawn from class-dependent but overlapping distributions (every word has
    some weight for every class), its noun is the true class name in 25 % of captions, a wrong
    class name (uniform over the other nine) in 10 %, and a generic word ("item", "piece", ...)
    in the other 65 %. A model that reads the text therefore gets a useful but unreliable hint
    and still has to look at the image. `CLASS_PROMPTS` ("a photo of a {name}") are the
    CLIP-style zero-shot prompts; no caption is one of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from mmkit.data.catalog import (
    BUILTIN_DATASETS,
    CAPTION_CONTEXT_LENGTH,
    CIFAR_CLASSES,
    CLASS_PROMPTS,
    FASHION_CLASSES,
    RAVDESS_EMOTIONS,
)
from mmkit.data.core import Dataset, standardize_
from mmkit.data.formats.cifar10 import luma
from mmkit.data.tokenizer import encode_batch

__all__ = ["CAPTION_CONTEXT_LENGTH", "CLASS_PROMPTS", "GENERATORS"]  # the prompts live in mmkit.data.catalog


# ---------------------------------------------------------------------------------------------
# shared helpers


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one thread, then restore the thread count.

    Generation is many medium-sized elementwise ops: on one thread it takes about a second, while
    two threads gain little and, when another process holds a core, wait at every op's barrier
    (measured: synthetic-av 1.0 s on one thread vs 27 s on two with a busy neighbour). One thread
    also makes the float reductions, hence the tensors, the same on any machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _generator(make: Callable[[int], Dataset]) -> Callable[[int], Dataset]:
    @functools.wraps(make)
    def generate(seed: int) -> Dataset:
        with _one_thread():
            return make(seed)

    return generate


def _split_sizes(name: str) -> tuple[int, int, int]:
    info = BUILTIN_DATASETS[name]
    return info.train, info.val, info.test


def _balanced_labels(sizes: tuple[int, ...], num_classes: int, generator: torch.Generator):
    """Labels as equal as possible per class within each split, shuffled within the split."""
    labels, split = [], []
    for code, n in enumerate(sizes):
        labels.append((torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)])
        split.append(torch.full((n,), code, dtype=torch.uint8))
    return torch.cat(labels), torch.cat(split)


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Elementwise HSV (each in [0, 1]) → RGB stacked on a new last dimension."""
    channels = []
    for n in (5.0, 3.0, 1.0):  # the standard closed form: R, G, B
        k = (n + hue * 6.0) % 6.0
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, dim=-1)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (ys, xs), each [size, size], in pixels."""
    axis = torch.arange(size, dtype=torch.float32)
    return torch.meshgrid(axis, axis, indexing="ij")


# ---------------------------------------------------------------------------------------------
# synthetic-cifar

CIFAR_SIZE = 32
DISK, RING, STRIPES, CHECKER, TRIANGLE, SQUARE, CROSS = range(7)
ANY_HUE = -1.0
# (shape, mean hue) per class, in CIFAR_CLASSES order; hues on the HSV circle [0, 1)
CIFAR_CLASS_LOOKS = (
    (DISK, 0.62),  # airplane: blue disk
    (DISK, 0.02),  # automobile: red disk
    (RING, 0.33),  # bird: green ring
    (RING, 0.10),  # cat: orange ring (luma close to green's, so brightness cannot tell)
    (STRIPES, ANY_HUE),  # deer
    (CHECKER, ANY_HUE),  # dog
    (TRIANGLE, ANY_HUE),  # frog
    (SQUARE, ANY_HUE),  # horse
    (CROSS, 0.50),  # ship: cyan cross
    (CROSS, 0.83),  # truck: magenta cross
)
CIFAR_HUE_JITTER = 0.05  # std of a colour class's hue: neighbours (red/orange) overlap a little
CIFAR_POSITION_JITTER = 2.0  # px either way; more makes an MLP's job much harder than a CNN's
CIFAR_CLUTTER_BLOBS = 3
CIFAR_NOISE = 0.06  # pixel noise std on the [0, 1] image


def _cifar_shape_mask(shape: int, u: torch.Tensor, v: torch.Tensor, sharpness: torch.Tensor) -> torch.Tensor:
    """Soft mask [n, H, W] of one shape in object coordinates (u, v), radius 1."""

    def inside(margin: torch.Tensor) -> torch.Tensor:  # ~1 where margin > 0, soft edge one px wide
        return torch.sigmoid(sharpness * margin)

    def box() -> torch.Tensor:
        return inside(1 - u.abs()) * inside(1 - v.abs())

    if shape == DISK:
        return inside(1 - torch.sqrt(u * u + v * v))
    if shape == RING:
        return inside(0.3 - (torch.sqrt(u * u + v * v) - 0.7).abs())
    if shape == STRIPES:  # two periods of horizontal stripes
        return box() * inside(0.5 * torch.sin(v * (2 * math.pi)))
    if shape == CHECKER:
        return box() * inside(0.5 * torch.sin(u * (1.5 * math.pi)) * torch.sin(v * (1.5 * math.pi)))
    if shape == TRIANGLE:
        return inside(v + 0.9) * inside(0.55 * (1 - v) - u.abs()) * inside(1 - v)
    if shape == CROSS:
        arms = torch.maximum(inside(0.3 - u.abs()), inside(0.3 - v.abs()))
        return inside(1 - 0.8 * torch.sqrt(u * u + v * v)) * arms
    return box()  # SQUARE


RENDER_CHUNK = 256  # samples drawn at once: small planes stay in cache and peak memory stays low


@_generator
def make_synthetic_cifar(seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    labels, split = _balanced_labels(_split_sizes("synthetic-cifar"), len(CIFAR_CLASSES), generator)
    n, size = labels.shape[0], CIFAR_SIZE
    looks = _cifar_looks(labels, generator)
    image = torch.empty(n, 3, size, size)
    for start in range(0, n, RENDER_CHUNK):
        rows = slice(start, start + RENDER_CHUNK)
        image[rows] = _render_cifar({key: value[rows] for key, value in looks.items()})
    image.add_(CIFAR_NOISE * torch.randn(image.shape, generator=generator)).clamp_(0, 1)
    brightness = luma(image)  # (N, H, W)
    train = split == 0
    inputs = {
        "color": standardize_(image.reshape(n, 3 * size * size), train),
        "brightness": standardize_(brightness.reshape(n, size * size), train),
    }
    return Dataset("synthetic-cifar", inputs, labels, split, None, CIFAR_CLASSES)


def _cifar_looks(labels: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random choice of every image, per sample: background, clutter, the object."""
    n, centre = labels.shape[0], (CIFAR_SIZE - 1) / 2

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    looks = {  # background: a linear gradient between two muted colours, in a random direction
        "color_a": _hsv_to_rgb(uniform(n), 0.5 * uniform(n), 0.3 + 0.5 * uniform(n)),  # (N, 3)
        "color_b": _hsv_to_rgb(uniform(n), 0.5 * uniform(n), 0.3 + 0.5 * uniform(n)),
        "angle": 2 * math.pi * uniform(n),
    }
    blobs = []  # clutter: small blobs of any colour anywhere
    for _ in range(CIFAR_CLUTTER_BLOBS):
        x, y, radius = CIFAR_SIZE * uniform(n), CIFAR_SIZE * uniform(n), 1.5 + 2.5 * uniform(n)
        color = _hsv_to_rgb(uniform(n), 0.3 + 0.7 * uniform(n), 0.2 + 0.8 * uniform(n))
        blobs.append(torch.cat([torch.stack([x, y, radius], 1), color], 1))  # (N, 6)
    looks["blobs"] = torch.stack(blobs, 1)  # (N, blobs, 6): x, y, radius, R, G, B
    # the object: class shape and hue, random placement, size, rotation, saturation, value
    looks["shape"] = torch.tensor([shape for shape, _ in CIFAR_CLASS_LOOKS])[labels]
    mean_hue = torch.tensor([hue for _, hue in CIFAR_CLASS_LOOKS])[labels]
    jittered_hue = (mean_hue + CIFAR_HUE_JITTER * torch.randn(n, generator=generator)) % 1.0
    hue = torch.where(mean_hue == ANY_HUE, uniform(n), jittered_hue)
    looks["color"] = _hsv_to_rgb(hue, 0.55 + 0.45 * uniform(n), 0.45 + 0.55 * uniform(n))
    looks["x"] = centre + CIFAR_POSITION_JITTER * (2 * uniform(n) - 1)
    looks["y"] = centre + CIFAR_POSITION_JITTER * (2 * uniform(n) - 1)
    looks["radius"] = 7.0 + 3.0 * uniform(n)
    looks["rotation"] = 0.5 * (uniform(n) - 0.5)
    return looks


def _render_cifar(looks: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, 3, H, W) noiseless images in [0, 1] from `_cifar_looks` rows."""
    size, centre = CIFAR_SIZE, (CIFAR_SIZE - 1) / 2
    ys, xs = _grid(size)
    n = looks["shape"].shape[0]

    def column(key: str) -> torch.Tensor:  # (n,) → (n, 1, 1), broadcasting over pixels
        return looks[key][:, None, None]

    angle = column("angle")
    ramp = ((xs - centre) * torch.cos(angle) + (ys - centre) * torch.sin(angle)) / size + 0.5  # (n, H, W)
    image = torch.lerp(looks["color_a"][:, :, None, None], looks["color_b"][:, :, None, None], ramp[:, None])

    for blob in looks["blobs"].unbind(1):  # (n, 6)
        x, y, radius = (blob[:, i, None, None] for i in range(3))
        distance = torch.sqrt((xs - x) ** 2 + (ys - y) ** 2)
        inside = torch.sigmoid(3 * (radius - distance))[:, None]  # (n, 1, H, W)
        image = torch.lerp(image, blob[:, 3:, None, None], inside)

    radius, rotation = column("radius"), column("rotation")
    dx, dy = (xs - column("x")) / radius, (ys - column("y")) / radius
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # (n, H, W) object coordinates, radius 1
    sharpness = 1.5 * radius  # the soft edge is about one pixel wide whatever the size
    mask = torch.empty(n, size, size)
    shapes = looks["shape"]
    for shape in torch.unique(shapes).tolist():
        members = torch.nonzero(shapes == shape).flatten()
        mask[members] = _cifar_shape_mask(shape, u[members], v[members], sharpness[members])
    return torch.lerp(image, looks["color"][:, :, None, None], mask[:, None])


# ---------------------------------------------------------------------------------------------
# synthetic-av

AV_ACTORS = 24
AV_SPLIT_OF_ACTOR = tuple(0 if a <= 16 else 1 if a <= 20 else 2 for a in range(1, AV_ACTORS + 1))
AV_CLIPS_PER_CLASS = (8, 16, 16, 16, 16, 16, 16, 16)  # per actor, RAVDESS_EMOTIONS order: 120 clips
AUDIO_FRAMES, MEL_BINS = 64, 40
VIDEO_FRAMES, FRAME_SIZE = 8, 24
AUDIO_GAIN_JITTER = 4.0  # dB either way per clip: loudness alone is an unreliable cue
NORMAL_INTENSITY = 0.6  # "normal" clips show 60 % of a "strong" clip's cues

# Audio cue per emotion, as the deviation from the actor's neutral voice:
#   pitch shift (semitones), pitch slope over the clip (semitones), early pitch peak (semitones),
#   tremolo depth (semitones), loudness (dB), syllables per clip (neutral 10), tilt (dB, + = duller)
AUDIO_CUES = torch.tensor([
    # shift slope  peak  trem  loud  rate  tilt
    [0.0,   0.0,  0.0,  0.0,  0.0,  0.0,  0.0],  # neutral
    [-1.0, -1.5,  0.0,  0.0, -5.0, -3.0,  4.0],  # calm: quieter, slower, duller — face ≈ neutral
    [3.0,   3.0,  0.0,  0.0,  3.0,  2.0, -3.0],  # happy: rising
    [-2.0, -4.0,  0.0,  0.0, -6.0, -3.0,  6.0],  # sad: falling, quiet
    [2.0,  -1.0,  0.0,  0.0,  8.0,  3.0, -8.0],  # angry: loud, bright
    [4.0,   0.0,  0.0,  1.5,  2.0,  4.0, -2.0],  # fearful: high, trembling, fast
    [-0.5, -0.5,  0.0,  0.0,  0.5, -0.5,  1.0],  # disgust: ≈ neutral voice
    [3.0,   0.0,  5.0,  0.0,  3.0,  0.0, -3.0],  # surprised: early pitch peak
])
# Video cue per emotion (deviation from neutral): mouth opening, smile (− frown), brow raise
# (− lowered), inner-brow raise (− knitted), eye opening, nose wrinkles
VIDEO_CUES = torch.tensor([
    # open  smile brow  inner  eyes  wrinkle
    [0.0,   0.0,  0.0,  0.0,   0.0,  0.0],  # neutral
    [-0.05, 0.15, 0.0,  0.0,  -0.15, 0.0],  # calm ≈ neutral
    [0.2,   1.0,  0.2,  0.0,  -0.3,  0.0],  # happy: smile
    [-0.1, -0.8,  0.0,  1.0,  -0.4,  0.0],  # sad: frown, inner brows up
    [0.2,  -0.4, -1.0, -1.0,   0.2,  0.3],  # angry: brows down and knitted
    [0.6,  -0.2,  1.0,  0.4,   0.8,  0.0],  # fearful ≈ surprised's face
    [0.0,  -0.5, -0.5, -0.3,  -0.5,  1.0],  # disgust: wrinkles, frown, lowered brows
    [0.7,   0.0,  1.1,  0.0,   0.8,  0.0],  # surprised: open mouth, raised brows
])


def _av_layout(generator: torch.Generator):
    """labels, actor (1–24), intensity, split per clip: actors in order, clips shuffled per split."""
    clips_per_class = torch.tensor(AV_CLIPS_PER_CLASS)
    per_actor = torch.repeat_interleave(torch.arange(clips_per_class.numel()), clips_per_class)
    labels = per_actor.repeat(AV_ACTORS)
    actors = torch.arange(1, AV_ACTORS + 1).repeat_interleave(per_actor.numel())
    # within an actor and class, alternate strong/normal; neutral is always normal (as in RAVDESS)
    rank = torch.cat([torch.arange(c) for c in AV_CLIPS_PER_CLASS]).repeat(AV_ACTORS)
    intensity = torch.where((rank % 2 == 0) | (labels == 0), NORMAL_INTENSITY, 1.0)
    split = torch.tensor(AV_SPLIT_OF_ACTOR, dtype=torch.uint8)[actors - 1]
    order = torch.cat([
        members[torch.randperm(members.numel(), generator=generator)]
        for members in (torch.nonzero(split == code).flatten() for code in range(3))
    ])
    return labels[order], actors[order], intensity[order], split[order]


def _mel_bins() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre frequency (Hz), bandwidth (Hz) and mel value of each of the MEL_BINS bins."""

    def mel(f: torch.Tensor) -> torch.Tensor:
        return 2595 * torch.log10(1 + f / 700)

    points = torch.linspace(float(mel(torch.tensor(60.0))), float(mel(torch.tensor(4000.0))), MEL_BINS + 2)
    hz = 700 * (10 ** (points / 2595) - 1)
    return hz[1:-1], hz[2:] - hz[:-2], points[1:-1]


def _synth_audio(labels, strength, actor, syllable_rate, syllable_phase, generator) -> torch.Tensor:
    """(N, AUDIO_FRAMES, MEL_BINS) log-mel energies (natural log of power), not yet standardised."""
    n = labels.shape[0]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    cue = AUDIO_CUES[labels] * strength[:, None]  # (N, 7)
    shift, slope, peak, tremolo, loudness, _, tilt = cue.unbind(1)
    tau = torch.linspace(0, 1, AUDIO_FRAMES)  # clip time in [0, 1]
    clip_shift = shift + 1.0 * normal(n)  # semitones: clip-to-clip prosody varies
    clip_slope = slope + 1.0 * normal(n)
    wander = 0.8 * normal(n, 1) * torch.sin(2 * math.pi * (tau * (0.5 + normal(n, 1).abs()) + normal(n, 1)))
    semitones = (
        clip_shift[:, None]
        + clip_slope[:, None] * (tau - 0.5)
        + peak[:, None] * torch.exp(-(((tau - 0.2) / 0.1) ** 2))
        + tremolo[:, None] * torch.sin(2 * math.pi * 14 * tau + 6.28 * torch.rand(n, 1, generator=generator))
        + wander
    )
    f0 = actor["f0"][:, None] * 2 ** (semitones / 12)  # (N, T) Hz

    hz, bandwidth, mel_value = _mel_bins()  # (M,)
    # harmonic comb at multiples of f0; bins much wider than f0 see an unresolved, flat spectrum
    ratio = hz / f0[..., None]  # (N, T, M)
    resolved = torch.exp(-((bandwidth / f0[..., None]) ** 2))
    comb = (1 - resolved) * 0.5 + resolved * ((1 + torch.cos(2 * math.pi * ratio)) / 2) ** 4
    # formants (F1-F3, scaled by the actor's vocal tract) and spectral tilt, in dB over mel
    formants = torch.tensor([500.0, 1500.0, 2500.0]) * actor["formant_scale"][:, None]  # (N, 3)
    formant_mel = 2595 * torch.log10(1 + formants / 700)
    vowel = 60 * normal(n, 3)  # per-clip vowel colour: formants move by ~60 mel
    envelope_db = (
        torch.tensor([12.0, 8.0, 5.0])[None, None, :]
        * torch.exp(-(((mel_value[None, :, None] - (formant_mel + vowel)[:, None, :]) / 120) ** 2))
    ).sum(-1)  # (N, M)
    tilt_db = -(8.0 + tilt[:, None]) * mel_value / mel_value[-1]  # (N, M)
    # syllable bursts between a random onset and offset
    bursts = torch.relu(torch.sin(math.pi * syllable_rate[:, None] * tau + syllable_phase[:, None])) ** 0.7
    onset = 0.05 + 0.15 * torch.rand(n, 1, generator=generator)
    offset = 0.8 + 0.15 * torch.rand(n, 1, generator=generator)
    voiced = bursts * torch.sigmoid(40 * (tau - onset)) * torch.sigmoid(40 * (offset - tau))  # (N, T)
    gain_db = AUDIO_GAIN_JITTER * (2 * torch.rand(n, 1, generator=generator) - 1)  # recording level
    level_db = gain_db + (actor["loudness"] + loudness)[:, None] + 10 * torch.log10(voiced + 1e-3)  # (N, T)
    speech_db = level_db[..., None] + (envelope_db + tilt_db)[:, None, :] + 10 * torch.log10(comb + 1e-2)
    floor_db = -25.0 + 3.0 * normal(n, 1, 1)  # background noise level per clip
    power = 10 ** (speech_db / 10) + 10 ** (floor_db / 10)
    log_mel = torch.log(power) + 0.35 * normal(n, AUDIO_FRAMES, MEL_BINS)
    return log_mel


VIDEO_PLACEMENT_JITTER = 2.5  # px either way per clip, on top of the actor's own offset


def _synth_video(labels, strength, actor, syllable_rate, syllable_phase, generator) -> torch.Tensor:
    """(N, VIDEO_FRAMES, 3, FRAME_SIZE, FRAME_SIZE) RGB in [0, 1], not yet standardised."""
    n = labels.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    # per clip and frame: the expression, the talking mouth, the head position
    cue = VIDEO_CUES[labels] * strength[:, None]  # (N, 6)
    tau = torch.linspace(0, 1, VIDEO_FRAMES)  # (F,)
    ramp = torch.clamp((tau - 0.3 * uniform(n, 1)) / 0.3, 0, 1)  # (N, F) builds up from a random onset
    expression = cue[:, None, :] * ramp[..., None] + 0.12 * normal(n, 1, 6)  # (N, F, 6), per-clip noise
    talking = torch.sin(math.pi * syllable_rate[:, None] * tau + syllable_phase[:, None]).abs()  # (N, F)
    expression[..., 0] += 0.35 * talking  # the mouth opens with each syllable
    drift = torch.cumsum(0.35 * normal(n, VIDEO_FRAMES, 2), dim=1)  # head motion, px
    placement = VIDEO_PLACEMENT_JITTER * (2 * uniform(n, 2) - 1)  # where the camera caught the face, px
    centre_x = (FRAME_SIZE - 1) / 2 + actor["face_dx"][:, None] + placement[:, :1] + drift[..., 0]  # (N, F)
    centre_y = (FRAME_SIZE - 1) / 2 + 0.5 + actor["face_dy"][:, None] + placement[:, 1:] + drift[..., 1]
    skin = actor["skin"] * (0.85 + 0.3 * uniform(n, 1))  # (N, 3): the actor's tone under this light
    background = _hsv_to_rgb(uniform(n), 0.4 * uniform(n), 0.15 + 0.5 * uniform(n))  # (N, 3)

    video = torch.empty(n, VIDEO_FRAMES, 3, FRAME_SIZE, FRAME_SIZE)
    for start in range(0, n, RENDER_CHUNK):
        clips = slice(start, start + RENDER_CHUNK)
        video[clips] = _render_faces(
            expression[clips], centre_x[clips], centre_y[clips], actor["face_scale"][clips],
            skin[clips], background[clips],
        )
        video[clips] += 0.06 * torch.randn(video[clips].shape, generator=generator)
    return video.clamp_(0, 1)


def _render_faces(expression, centre_x, centre_y, face_scale, skin, background) -> torch.Tensor:
    """(n, F, 3, H, W) schematic faces; expression (n, F, 6) in VIDEO_CUES's column order."""
    opening, smile, brow, inner, eyes, wrinkle = (e[..., None, None] for e in expression.unbind(-1))
    ys, xs = _grid(FRAME_SIZE)  # (H, W)
    x, y = xs - centre_x[..., None, None], ys - centre_y[..., None, None]  # (n, F, H, W) px from the centre
    scale = face_scale[:, None, None, None]

    def inside(margin: torch.Tensor, sharpness: float = 3.0) -> torch.Tensor:
        return torch.sigmoid(sharpness * margin)

    face = inside(1 - torch.sqrt((x / (7.5 * scale)) ** 2 + (y / (9.0 * scale)) ** 2), 8.0)
    eye_dx, eye_y = 3.2 * scale, -2.0 * scale
    eye_x = x.abs() - eye_dx  # both eyes at once, mirrored
    eye_height = torch.clamp(0.6 + 0.5 * eyes, min=0.15)
    eye_mask = inside(1 - torch.sqrt((eye_x / 1.3) ** 2 + ((y - eye_y) / eye_height) ** 2), 4.0)
    brow_y = -4.6 * scale - 1.2 * brow - 0.8 * inner * (eye_dx - x.abs()) / 2  # y grows downward
    brow_mask = inside(0.55 - (y - brow_y).abs()) * inside(2.0 - eye_x.abs())
    mouth_y = 4.6 * scale - 1.2 * smile * ((x / (3.0 * scale)) ** 2 - 0.4)  # corners up for a smile
    mouth_height = 0.35 + 1.4 * opening.clamp(min=0)
    mouth_mask = inside(mouth_height - (y - mouth_y).abs()) * inside(3.0 * scale - x.abs())
    wrinkle_mask = inside(0.4 - (y - 1.2 * (x.abs() - 1.4)).abs()) * inside(1.0 - (x.abs() - 1.6).abs())

    wrinkles = wrinkle.clamp(min=0) * wrinkle_mask
    darkening = (1 - 0.75 * eye_mask) * (1 - 0.7 * brow_mask) * (1 - 0.6 * wrinkles)  # (n, F, H, W)
    background, skin = background[:, None, :, None, None], skin[:, None, :, None, None]  # (n, 1, 3, 1, 1)
    frames = torch.lerp(background, skin, face[:, :, None])  # (n, F, 3, H, W)
    frames *= darkening[:, :, None]
    lips = torch.tensor([0.45, 0.08, 0.1])[:, None, None]
    return torch.lerp(frames, lips, (0.85 * mouth_mask)[:, :, None])


def _av_actors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-actor traits, [AV_ACTORS, ...] (index = actor id − 1); odd actors male as in RAVDESS."""

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    male = torch.arange(1, AV_ACTORS + 1) % 2 == 1
    skin_hue = 0.04 + 0.05 * uniform(AV_ACTORS)
    return {
        "f0": torch.where(male, 120.0, 210.0) * 2 ** ((4 * uniform(AV_ACTORS) - 2) / 12),
        "formant_scale": torch.where(male, 1.0, 1.15) * (0.92 + 0.16 * uniform(AV_ACTORS)),
        "loudness": 6 * (uniform(AV_ACTORS) - 0.5),  # dB
        "rate": 8 + 4 * uniform(AV_ACTORS),  # syllables per clip
        "expressiveness": 0.7 + 0.6 * uniform(AV_ACTORS),
        "skin": _hsv_to_rgb(skin_hue, 0.3 + 0.35 * uniform(AV_ACTORS), 0.45 + 0.5 * uniform(AV_ACTORS)),
        "face_dx": 3 * (uniform(AV_ACTORS) - 0.5),
        "face_dy": 3 * (uniform(AV_ACTORS) - 0.5),
        "face_scale": 0.9 + 0.2 * uniform(AV_ACTORS),
    }


@_generator
def make_synthetic_av(seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    labels, actors, intensity, split = _av_layout(generator)
    n = labels.shape[0]
    traits = _av_actors(generator)
    actor = {key: value[actors - 1] for key, value in traits.items()}  # per clip
    strength = intensity * actor["expressiveness"]  # how strongly each clip shows its emotion
    # syllables are shared by voice and mouth: the same rate and phase drive both
    syllable_rate = actor["rate"] + AUDIO_CUES[labels, 5] * strength + torch.randn(n, generator=generator)
    syllable_rate = syllable_rate.clamp(min=3)
    syllable_phase = 2 * math.pi * torch.rand(n, generator=generator)
    audio = _synth_audio(labels, strength, actor, syllable_rate, syllable_phase, generator)
    video = _synth_video(labels, strength, actor, syllable_rate, syllable_phase, generator)
    train = split == 0
    inputs = {"audio": standardize_(audio, train), "video": standardize_(video, train)}
    return Dataset("synthetic-av", inputs, labels, split, actors.to(torch.int64), RAVDESS_EMOTIONS)


# ---------------------------------------------------------------------------------------------
# synthetic-fashion

FASHION_SIZE = 28
# Each class has one or more variants (a shirt with long or short sleeves, a bag with or without
# a handle, ...), each up to six trapezoids in a [-1, 1]² canvas (y grows downward):
#   (y_top, y_bottom, x_centre_top, x_centre_bottom, half_width_top, half_width_bottom, value)
# value > 0 adds material at that brightness; value < 0 cuts (neck lines, openings, handles).
_T = tuple[float, float, float, float, float, float, float]
_TORSO = (-0.62, 0.8, 0.0, 0.0, 0.43, 0.41, 1.0)
_SHORT_SLEEVES = ((-0.62, -0.18, -0.48, -0.74, 0.14, 0.13, 1.0), (-0.62, -0.18, 0.48, 0.74, 0.14, 0.13, 1.0))
_LONG_SLEEVES = ((-0.62, 0.72, -0.52, -0.66, 0.13, 0.10, 1.0), (-0.62, 0.72, 0.52, 0.66, 0.13, 0.10, 1.0))
_ROUND_NECK = (-0.75, -0.5, 0.0, 0.0, 0.17, 0.08, -1.0)
_SHIRT_COLLAR = ((-0.75, -0.45, 0.0, 0.0, 0.2, 0.05, 1.3), (-0.45, 0.8, 0.0, 0.0, 0.02, 0.02, -0.5))
FASHION_PARTS: tuple[tuple[tuple[_T, ...], ...], ...] = (
    (  # t-shirt/top: short sleeves or sleeveless, round neck
        (_TORSO, *_SHORT_SLEEVES, _ROUND_NECK),
        ((-0.62, 0.8, 0.0, 0.0, 0.36, 0.4, 1.0), _ROUND_NECK),
    ),
    (  # trouser: waistband and two legs with a gap
        ((-0.85, -0.5, 0.0, 0.0, 0.36, 0.38, 1.0), (-0.55, 0.92, -0.18, -0.24, 0.18, 0.14, 1.0),
         (-0.55, 0.92, 0.18, 0.24, 0.18, 0.14, 1.0)),
    ),
    (  # pullover: long sleeves, small neck
        (_TORSO, *_LONG_SLEEVES, (-0.72, -0.55, 0.0, 0.0, 0.12, 0.06, -1.0)),
    ),
    (  # dress: narrow top flaring to the hem, with straps or short sleeves
        ((-0.55, 0.9, 0.0, 0.0, 0.2, 0.6, 1.0), (-0.85, -0.5, -0.14, -0.16, 0.04, 0.05, 1.0),
         (-0.85, -0.5, 0.14, 0.16, 0.04, 0.05, 1.0)),
        ((-0.7, 0.9, 0.0, 0.0, 0.25, 0.5, 1.0), (-0.7, -0.35, -0.3, -0.5, 0.1, 0.1, 1.0),
         (-0.7, -0.35, 0.3, 0.5, 0.1, 0.1, 1.0), _ROUND_NECK),
    ),
    (  # coat: long torso, long sleeves, opening down the front
        ((-0.7, 0.92, 0.0, 0.0, 0.45, 0.46, 1.0), (-0.66, 0.82, -0.55, -0.7, 0.14, 0.11, 1.0),
         (-0.66, 0.82, 0.55, 0.7, 0.14, 0.11, 1.0), (-0.5, 0.92, 0.0, 0.0, 0.025, 0.025, -1.0),
         (-0.8, -0.52, 0.0, 0.0, 0.14, 0.05, -1.0)),
    ),
    (  # sandal: thin sole and a few straps
        ((0.38, 0.56, 0.0, 0.0, 0.85, 0.85, 0.9), (-0.05, 0.4, -0.35, -0.05, 0.06, 0.06, 0.8),
         (-0.05, 0.4, 0.3, 0.1, 0.06, 0.06, 0.8), (-0.3, 0.4, -0.7, -0.6, 0.05, 0.05, 0.8)),
        ((0.3, 0.5, 0.0, 0.0, 0.85, 0.85, 0.9), (0.0, 0.32, 0.0, 0.0, 0.6, 0.7, 0.7),
         (0.05, 0.32, 0.0, 0.0, 0.45, 0.55, -1.0)),
    ),
    (  # shirt: collar and button placket, long or short sleeves — close to pullover and t-shirt
        (_TORSO, *_LONG_SLEEVES, *_SHIRT_COLLAR),
        (_TORSO, *_SHORT_SLEEVES, *_SHIRT_COLLAR),
    ),
    (  # sneaker: low shoe widening to the sole, heel collar
        ((-0.1, 0.45, 0.12, 0.05, 0.5, 0.86, 1.0), (-0.38, -0.05, -0.48, -0.48, 0.22, 0.3, 1.0),
         (0.42, 0.55, 0.05, 0.05, 0.86, 0.86, 1.2)),
    ),
    (  # bag: body with a handle, or a clutch with a flap
        ((-0.3, 0.82, 0.0, 0.0, 0.68, 0.74, 1.0), (-0.82, -0.28, 0.0, 0.0, 0.42, 0.46, 1.0),
         (-0.7, -0.3, 0.0, 0.0, 0.3, 0.33, -1.0)),
        ((-0.35, 0.6, 0.0, 0.0, 0.8, 0.8, 1.0), (-0.35, 0.05, 0.0, 0.0, 0.8, 0.1, 1.2)),
    ),
    (  # ankle boot: shaft, foot, heel sole
        ((-0.82, 0.25, -0.28, -0.25, 0.3, 0.32, 1.0), (0.05, 0.6, 0.08, 0.12, 0.5, 0.74, 1.0),
         (0.52, 0.66, 0.1, 0.1, 0.76, 0.76, 1.2)),
    ),
)
FASHION_PART_JITTER = 0.07  # std of every coordinate, per sample and part (canvas units)
FASHION_SCALE = (0.78, 1.12)  # range of the x and y scale factors (drawn separately)
FASHION_SHIFT_PX = 3.5  # translation, either way
FASHION_ROTATION = 0.15  # rad, either way
FASHION_NOISE = 0.08

# caption vocabulary; weights below are "extra" weight per class on top of 1 for every word
COLOURS = (
    "black", "white", "grey", "navy", "red", "beige", "brown", "olive", "pink", "blue", "cream", "green",
)
PATTERNS = ("plain", "striped", "knit", "quilted", "ribbed", "printed", "checked", "washed")
MATERIALS = (
    "cotton", "denim", "leather", "wool", "canvas", "nylon",
    "silk", "suede", "linen", "fleece", "rubber", "jersey",
)
SEASONS = ("summer", "winter", "spring", "autumn", "all year")
GENERIC_NOUNS = ("item", "piece", "product", "find", "pick", "style")
# class → (favoured colours, patterns, materials, seasons); each favoured word gets FAVOURED_WEIGHT
FASHION_FAVOURITES = (
    (("white", "black", "pink"), ("printed", "plain"), ("cotton", "jersey"), ("summer",)),
    (("navy", "blue", "black"), ("washed", "plain"), ("denim", "cotton"), ("all year",)),
    (("grey", "cream", "navy"), ("knit", "ribbed"), ("wool", "fleece"), ("winter", "autumn")),
    (("red", "pink", "black"), ("printed", "plain"), ("silk", "linen"), ("summer", "spring")),
    (("black", "brown", "olive"), ("quilted", "plain"), ("wool", "nylon"), ("winter",)),
    (("brown", "beige", "black"), ("plain", "printed"), ("leather", "rubber"), ("summer",)),
    (("white", "blue", "grey"), ("checked", "striped"), ("cotton", "linen"), ("spring", "all year")),
    (("white", "black", "grey"), ("plain", "washed"), ("canvas", "rubber"), ("all year", "spring")),
    (("black", "brown", "beige"), ("quilted", "plain"), ("leather", "canvas"), ("all year",)),
    (("brown", "black", "beige"), ("plain", "quilted"), ("suede", "leather"), ("autumn", "winter")),
)
FAVOURED_WEIGHT = 2.0  # a favoured word is 3× as likely as any other: a hint, not a giveaway
TRUE_NAME_FRACTION = 0.25  # of captions naming the true class
WRONG_NAME_FRACTION = 0.10  # of captions naming another class; the rest use a generic noun


def _render_fashion(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, 1, 28, 28) silhouettes in [0, 1], not yet standardised."""
    n, size = labels.shape[0], FASHION_SIZE
    variants = [variant for per_class in FASHION_PARTS for variant in per_class]
    max_parts = max(len(parts) for parts in variants)
    table = torch.zeros(len(variants), max_parts, 7)  # missing parts have value 0: no effect
    for row, parts in enumerate(variants):
        table[row, : len(parts)] = torch.tensor(parts)
    counts = torch.tensor([len(per_class) for per_class in FASHION_PARTS])
    first = torch.cumsum(counts, 0) - counts  # row of each class's first variant
    variant = first[labels] + (torch.rand(n, generator=generator) * counts[labels]).long()
    parts = table[variant].clone()  # (N, P, 7)
    parts[..., :6] += FASHION_PART_JITTER * torch.randn(n, max_parts, 6, generator=generator)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    px = size / 2.2  # pixels per canvas unit: the canvas [-1.1, 1.1] fills the image
    looks = {
        "parts": parts,
        "scale": FASHION_SCALE[0] + (FASHION_SCALE[1] - FASHION_SCALE[0]) * uniform(n, 2),  # x and y
        "shift": FASHION_SHIFT_PX * (2 * uniform(n, 2) - 1) / px,  # canvas units
        "rotation": FASHION_ROTATION * (2 * uniform(n) - 1),
        "brightness": 0.35 + 0.6 * uniform(n),
        "frequency": 0.5 + 1.5 * uniform(n),  # texture stripes per 4 px
        "angle": math.pi * uniform(n),
        "depth": 0.35 * uniform(n),
    }
    image = torch.empty(n, size, size)
    for start in range(0, n, RENDER_CHUNK):
        rows = slice(start, start + RENDER_CHUNK)
        image[rows] = _render_garments({key: value[rows] for key, value in looks.items()})
    image += FASHION_NOISE * torch.randn(n, size, size, generator=generator)
    return image.clamp_(0, 1)[:, None]


def _render_garments(looks: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, H, W) noiseless textured silhouettes from `_render_fashion`'s per-sample draws."""
    size = FASHION_SIZE
    px = size / 2.2
    ys, xs = _grid(size)
    scale, shift = looks["scale"][:, :, None, None], looks["shift"][:, :, None, None]  # (n, 2, 1, 1)
    rotation = looks["rotation"][:, None, None]
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    # pixel → canvas coordinates of the un-rotated, un-scaled, un-shifted garment
    u = (xs - (size - 1) / 2) / px - shift[:, 0]  # (n, H, W)
    v = (ys - (size - 1) / 2) / px - shift[:, 1]
    x = (cos * u + sin * v) / scale[:, 0]
    y = (cos * v - sin * u) / scale[:, 1]
    sharpness = 12.0  # edge about one pixel wide
    material = torch.zeros_like(x)
    cut = torch.zeros_like(x)
    for part in looks["parts"].unbind(1):  # (n, 7)
        top, bottom, x_top, x_bottom, w_top, w_bottom, value = (c[:, None, None] for c in part.unbind(-1))
        along = torch.clamp((y - top) / (bottom - top).clamp(min=1e-3), 0, 1)
        centre = torch.lerp(x_top, x_bottom, along)
        half_width = torch.lerp(w_top, w_bottom, along)
        mask = (
            torch.sigmoid(sharpness * (y - top)) * torch.sigmoid(sharpness * (bottom - y))
            * torch.sigmoid(sharpness * (half_width - (x - centre).abs()))
        )
        material = torch.maximum(material, mask * value.clamp(min=0))
        cut = torch.maximum(cut, mask * (-value).clamp(min=0))
    silhouette = material * (1 - cut)

    angle, frequency = looks["angle"][:, None, None], looks["frequency"][:, None, None]
    stripes = torch.sin((xs * torch.cos(angle) + ys * torch.sin(angle)) * frequency * (math.pi / 2))
    texture = 1 - looks["depth"][:, None, None] * (0.5 + 0.5 * stripes)
    return silhouette * looks["brightness"][:, None, None] * texture


def _draw(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of `weights` (N, K), with probability proportional to the weights."""
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def _class_weights(
    favourites_of: Callable[[tuple], tuple[str, ...]], vocabulary: tuple[str, ...]
) -> torch.Tensor:
    weights = torch.ones(len(FASHION_FAVOURITES), len(vocabulary))
    for label, favourites in enumerate(FASHION_FAVOURITES):
        for word in favourites_of(favourites):
            weights[label, vocabulary.index(word)] += FAVOURED_WEIGHT
    return weights


def fashion_captions(labels: torch.Tensor, generator: torch.Generator) -> list[str]:
    """One caption per label (see the module docstring), at most 30 bytes so nothing is cut."""
    n = labels.shape[0]
    words = {
        "colour": _draw(_class_weights(lambda f: f[0], COLOURS)[labels], generator),
        "pattern": _draw(_class_weights(lambda f: f[1], PATTERNS)[labels], generator),
        "material": _draw(_class_weights(lambda f: f[2], MATERIALS)[labels], generator),
        "season": _draw(_class_weights(lambda f: f[3], SEASONS)[labels], generator),
    }
    num_classes = len(FASHION_CLASSES)
    mode = torch.rand(n, generator=generator)  # < true fraction: true name; then wrong name; else generic
    wrong = (labels + torch.randint(1, num_classes, (n,), generator=generator)) % num_classes
    generic = torch.randint(len(GENERIC_NOUNS), (n,), generator=generator)
    template = torch.randint(4, (n,), generator=generator)
    max_bytes = CAPTION_CONTEXT_LENGTH - 2  # BOS and EOS
    nouns = [
        FASHION_CLASSES[label] if m < TRUE_NAME_FRACTION
        else FASHION_CLASSES[other] if m < TRUE_NAME_FRACTION + WRONG_NAME_FRACTION
        else GENERIC_NOUNS[g]
        for label, m, other, g in zip(labels.tolist(), mode.tolist(), wrong.tolist(), generic.tolist(), strict=False)
    ]
    captions = []
    for noun, shape, c, p, m, s in zip(nouns, template.tolist(), *(words[k].tolist() for k in words), strict=False):
        colour, pattern, material, season = COLOURS[c], PATTERNS[p], MATERIALS[m], SEASONS[s]
        candidates = (  # richest first; the first that fits is used
            (f"{colour} {pattern} {material} {noun}", f"{colour} {material} {noun}", f"{colour} {noun}"),
            (f"{colour} {material} {noun}, {season}", f"{material} {noun}, {season}", f"{colour} {noun}"),
            (f"{pattern} {material} {noun}", f"{material} {noun}", noun),
            (f"{noun} in {colour} {material}", f"{noun} in {colour}", noun),
        )[shape]
        captions.append(next(c for c in candidates if len(c.encode()) <= max_bytes))
    return captions


@_generator
def make_synthetic_fashion(seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    labels, split = _balanced_labels(_split_sizes("synthetic-fashion"), len(FASHION_CLASSES), generator)
    image = _render_fashion(labels, generator)
    text = encode_batch(fashion_captions(labels, generator), CAPTION_CONTEXT_LENGTH)
    inputs = {"image": standardize_(image, split == 0), "text": text}
    return Dataset("synthetic-fashion", inputs, labels, split, None, FASHION_CLASSES)


GENERATORS: dict[str, Callable[[int], Dataset]] = {
    "synthetic-cifar": make_synthetic_cifar,
    "synthetic-av": make_synthetic_av,
    "synthetic-fashion": make_synthetic_fashion,
}
