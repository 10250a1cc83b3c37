"""sotto.edge.audio: files of any rate/channel count and raw firmware PCM become 16 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edge_testkit import LIBRISPEECH_FLAC, pcm16, tone, write_wav

from sotto.edge.audio import SAMPLE_RATE, AudioError, PcmStream, load_audio, pcm16_to_audio


def _dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)[int(np.argmax(spectrum))])


@pytest.mark.parametrize(
    ("rate", "channels", "seconds"),
    [(8_000, 2, 2.0), (44_100, 1, 1.5)],
    ids=["8kHz-stereo", "44.1kHz-mono"],
)
def test_wav_of_any_rate_and_layout_loads_as_16k_mono_float32(
    tmp_path: Path, rate: int, channels: int, seconds: float
) -> None:
    mono = tone(seconds, rate, freq=440.0, amplitude=0.5)
    samples = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    path = write_wav(tmp_path / f"clip_{rate}_{channels}.wav", samples, rate)

    audio = load_audio(path)

    assert audio.samples.dtype == np.float32
    assert audio.samples.ndim == 1
    assert audio.duration_s == pytest.approx(seconds, rel=0.01)
    assert len(audio.samples) == pytest.approx(seconds * SAMPLE_RATE, rel=0.01)
    # The content survives: still a 440 Hz tone at about the written level, within [-1, 1].
    assert _dominant_hz(audio.samples) == pytest.approx(440.0, abs=5.0)
    assert 0.4 < float(np.max(np.abs(audio.samples))) <= 1.0


def test_stereo_is_downmixed_not_one_channel_dropped(tmp_path: Path) -> None:
    left = tone(1.0, 8_000, freq=300.0, amplitude=0.4)
    right = tone(1.0, 8_000, freq=1_000.0, amplitude=0.4)
    path = write_wav(tmp_path / "two_tones.wav", np.stack([left, right], axis=1), 8_000)

    spectrum = np.abs(np.fft.rfft(load_audio(path).samples))
    freqs = np.fft.rfftfreq(SAMPLE_RATE, 1 / SAMPLE_RATE)
    power_300 = spectrum[np.abs(freqs - 300).argmin()]
    power_1000 = spectrum[np.abs(freqs - 1000).argmin()]
    assert power_300 > 0.5 * power_1000 and power_1000 > 0.5 * power_300


def test_real_flac_loads() -> None:
    audio = load_audio(LIBRISPEECH_FLAC)
    assert audio.samples.dtype == np.float32
    assert audio.duration_s > 1.0
    assert float(np.max(np.abs(audio.samples))) > 0.01  # not silence


def test_missing_file_raises_audio_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.wav"
    with pytest.raises(AudioError, match="nowhere.wav"):
        load_audio(missing)


def test_text_file_named_wav_raises_audio_error_naming_it(tmp_path: Path) -> None:
    fake = tmp_path / "x.wav"
    fake.write_text("this is not audio, only a text file with a .wav name\n" * 20)
    with pytest.raises(AudioError, match=r"x\.wav") as info:
        load_audio(fake)
    assert str(fake) in str(info.value)


def test_empty_file_raises_audio_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav"):
        load_audio(empty)


def test_pcm16_to_audio_scales_little_endian_int16() -> None:
    raw = np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes()
    audio = pcm16_to_audio(raw)
    assert audio.samples.dtype == np.float32
    np.testing.assert_allclose(audio.samples, [0.0, 0.5, -1.0, 32767 / 32768])


def test_pcm16_with_odd_byte_count_raises() -> None:
    with pytest.raises(AudioError, match="even number of bytes"):
        pcm16_to_audio(b"\x00\x01\x02")


def test_pcm_stream_concatenates_frames_of_any_size() -> None:
    samples = tone(0.5, SAMPLE_RATE, amplitude=0.5)
    raw = pcm16(samples)
    stream = PcmStream(max_seconds=5)
    # Odd-sized frames: a sample may be split across two pushes.
    for start in range(0, len(raw), 333):
        stream.push(raw[start : start + 333])

    audio = stream.finish()

    assert not stream.truncated
    np.testing.assert_array_equal(audio.samples, pcm16_to_audio(raw).samples)


def test_pcm_stream_is_bounded_and_sets_truncated() -> None:
    stream = PcmStream(max_seconds=0.5)
    frame = pcm16(tone(0.1, SAMPLE_RATE, amplitude=0.5))  # 100 ms per push
    for _ in range(20):  # 2 s pushed into a 0.5 s buffer
        stream.push(frame)
    assert stream.truncated
    audio = stream.finish()
    assert len(audio.samples) == int(0.5 * SAMPLE_RATE)


def test_pcm_stream_resets_after_finish() -> None:
    stream = PcmStream(max_seconds=1)
    first, second = pcm16(tone(0.2, SAMPLE_RATE, 300.0)), pcm16(tone(0.3, SAMPLE_RATE, 900.0))
    stream.push(first)
    assert len(stream.finish().samples) == int(0.2 * SAMPLE_RATE)

    stream.push(second)
    again = stream.finish()

    np.testing.assert_array_equal(again.samples, pcm16_to_audio(second).samples)
    assert len(stream.finish().samples) == 0


def test_pcm_stream_truncated_flag_is_per_utterance() -> None:
    stream = PcmStream(max_seconds=0.1)
    stream.push(pcm16(tone(0.5, SAMPLE_RATE)))
    assert stream.truncated
    stream.finish()

    stream.push(pcm16(tone(0.05, SAMPLE_RATE)))  # fits easily
    assert not stream.truncated
    assert len(stream.finish().samples) == int(0.05 * SAMPLE_RATE)


@pytest.mark.parametrize("bad", [0, -1.0])
def test_pcm_stream_needs_positive_bound(bad: float) -> None:
    with pytest.raises(ValueError, match="max_seconds"):
        PcmStream(max_seconds=bad)
