"""Audio and video features for the real datasets: the mel filterbank and log-mel against librosa
(a test-only reference), the band-limited resampler, WAV decoding and downmix, uniform frame
sampling and the centre crop through PyAV."""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from official_formats import write_tone_wav, write_video

from mmkit.data.audio import (
    LogMelSettings,
    fix_length,
    log_mel_spectrogram,
    mel_filterbank,
    read_audio,
    resample,
)
from mmkit.data.video import FrameSettings, read_video_frames, require_av, uniform_frame_indices
from mmkit.errors import MmkitError


def test_mel_filterbank_matches_librosa_slaney() -> None:
    librosa = pytest.importorskip("librosa")
    for rate, n_fft, n_mels, f_min, f_max in ((16_000, 512, 80, 0.0, None), (22_050, 1024, 40, 60.0, 7600.0)):
        ours = mel_filterbank(rate, n_fft, n_mels, f_min, f_max).numpy()
        reference = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max,
                                        htk=False, norm="slaney", dtype=np.float64)
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max() <= 1e-3 * np.abs(reference).max()
        assert np.allclose(ours, reference, rtol=1e-6, atol=1e-12)


def test_log_mel_matches_librosa_to_a_thousandth_of_a_db() -> None:
    librosa = pytest.importorskip("librosa")
    settings = LogMelSettings()  # 16 kHz, 80 mels, 25 ms window, 10 ms hop, 512-point FFT, top 80 dB
    generator = np.random.default_rng(1)
    t = np.arange(settings.num_samples) / settings.sample_rate
    signal = 0.4 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * generator.standard_normal(t.size)
    signal[: settings.num_samples // 4] = 0.0  # a silent stretch exercises the 80 dB floor
    ours = log_mel_spectrogram(torch.from_numpy(signal), settings).numpy()
    mel = librosa.feature.melspectrogram(
        y=signal, sr=16_000, n_fft=512, hop_length=160, win_length=400, window="hann", center=True,
        pad_mode="constant", power=2.0, n_mels=80, htk=False, norm="slaney",
    )
    reference = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=80.0).T  # (frames, n_mels)
    assert ours.shape == reference.shape == (300, 80)
    assert np.abs(ours - reference).max() < 1e-3  # dB
    assert ours.min() == pytest.approx(ours.max() - 80.0, abs=1e-3)


@pytest.mark.parametrize("rate", [48_000, 44_100, 22_050, 8_000])
def test_resampling_keeps_a_tone_and_its_length(rate: int) -> None:
    t = np.arange(rate) / rate  # one second
    out = resample(torch.from_numpy(np.sin(2 * np.pi * 1000 * t)), rate, 16_000)
    assert out.shape == (16_000,)
    exact = np.sin(2 * np.pi * 1000 * np.arange(16_000) / 16_000)
    assert np.abs(out.numpy() - exact)[200:-200].max() < 1e-4  # edges see the zero padding


def test_resampling_removes_what_would_alias() -> None:
    t = np.arange(48_000) / 48_000
    above_nyquist = torch.from_numpy(np.sin(2 * np.pi * 12_000 * t))  # would fold to 4 kHz at 16 kHz
    assert resample(above_nyquist, 48_000, 16_000)[200:-200].abs().max() < 1e-4
    assert resample(torch.ones(2, 300), 48_000, 16_000).shape == (2, 100)  # batched, ceil(300 / 3)


def test_fix_length_takes_the_centre_or_pads_evenly() -> None:
    assert fix_length(torch.arange(10.0), 4).tolist() == [3.0, 4.0, 5.0, 6.0]
    assert fix_length(torch.ones(3), 6).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_wav_is_decoded_downmixed_and_resampled(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    write_tone_wav(path, 1000.0, rate=22_050, channels=2, seconds=0.5)
    waveform, rate = read_audio(path)
    assert rate == 22_050 and waveform.shape == (2, 11_025) and waveform.dtype == torch.float32
    assert waveform[1].abs().max() == pytest.approx(0.25, abs=1e-3) and waveform[0].abs().max() == pytest.approx(0.5, abs=1e-3)


# --- video --------------------------------------------------------------------------------------


def test_video_frames_are_spread_uniformly_and_centre_cropped(tmp_path: Path) -> None:
    assert uniform_frame_indices(12, 4).tolist() == [1, 4, 7, 10]
    assert uniform_frame_indices(2, 4).tolist() == [0, 0, 1, 1]
    # MP4 states its frame count (only the picked frames are scaled); FLV does not (all are)
    for name, codec in (("ramp.mp4", "libx264"), ("ramp.flv", "flv")):
        path = tmp_path / name
        write_video(path, [(20 * i,) * 3 for i in range(12)], width=48, height=32, codec=codec)
        frames = read_video_frames(path, FrameSettings(frames=4, size=8))
        assert frames.shape == (4, 3, 8, 8) and frames.dtype == torch.uint8
        means = frames.float().mean(dim=(1, 2, 3))
        assert torch.allclose(means, torch.tensor([20.0, 80.0, 140.0, 200.0]), atol=8), (name, means)

    # a bright centre square between dark side bars: the centre crop sees only the square
    av = pytest.importorskip("av")
    path = tmp_path / "bars.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 32, "yuv420p"
        image = np.zeros((32, 96, 3), np.uint8)
        image[:, 32:64] = 230
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")), *stream.encode()]:
            container.mux(packet)
    crop = read_video_frames(path, FrameSettings(frames=1, size=8)).float()
    assert crop[:, :, 1:-1, 1:-1].min() > 200  # away from the compressed edges
    wide = read_video_frames(path, FrameSettings(frames=1, size=8, crop_scale=1.0)).float()
    assert torch.equal(crop, wide)


def test_missing_pyav_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_av(name: str, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(MmkitError, match=r"pip install 'mmkit-cli\[video\]'"):
        require_av()




def test_log_mel_settings_reject_impossible_values() -> None:
    with pytest.raises(MmkitError, match="hop"):
        LogMelSettings(hop_ms=30.0)
    with pytest.raises(MmkitError, match="crop scale"):
        FrameSettings(crop_scale=1.5)
    assert LogMelSettings().frames == 300 and LogMelSettings().n_fft == 512 and math.isclose(LogMelSettings().hop_ms, 10)
