"""sotto.edge.vad with the real Silero model: only speech may reach ASR (tiny Whisper invents text)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from edge_testkit import JFK_WAV, chords

from sotto.edge.audio import SAMPLE_RATE, Audio, load_audio
from sotto.edge.vad import SpeechGate, SpeechGateOptions


def _silence() -> np.ndarray:
    return np.zeros(3 * SAMPLE_RATE, dtype=np.float32)


def _white_noise() -> np.ndarray:
    # Gaussian noise at about -20 dBFS RMS: loud enough to register, far from clipping.
    return (np.random.default_rng(7).standard_normal(3 * SAMPLE_RATE) * 0.1).astype(np.float32)


def _music() -> np.ndarray:
    return chords(seconds_each=1.0, amplitude=0.3)


@pytest.mark.parametrize("make", [_silence, _white_noise, _music], ids=["silence", "white-noise", "chords"])
def test_non_speech_yields_no_speech(speech_gate: SpeechGate, make: Callable[[], np.ndarray]) -> None:
    samples = make()
    assert len(samples) == 3 * SAMPLE_RATE

    result = speech_gate.detect(Audio(samples))

    assert not result.has_speech
    assert result.speech is None


def test_empty_audio_yields_no_speech(speech_gate: SpeechGate) -> None:
    result = speech_gate.detect(Audio(np.zeros(0, dtype=np.float32)))
    assert not result.has_speech
    assert result.segments == []


def test_real_speech_yields_speech_trimmed_to_segments(speech_gate: SpeechGate) -> None:
    audio = load_audio(JFK_WAV)

    result = speech_gate.detect(audio)

    assert result.has_speech and result.speech is not None
    assert result.segments, "speech found but no segments"
    for start, end in result.segments:
        assert 0 <= start < end <= len(audio.samples)
    total = sum(end - start for start, end in result.segments)
    assert len(result.speech.samples) == total
    # The clip is mostly speech (about 8 of its 11 s), so the gate keeps most but not all of it.
    assert 0.5 * len(audio.samples) < total <= len(audio.samples)


def test_min_total_speech_turns_short_speech_into_no_speech() -> None:
    audio = load_audio(JFK_WAV)
    strict = SpeechGate(SpeechGateOptions(min_total_speech_ms=60_000))  # longer than the clip

    result = strict.detect(audio)

    assert result.segments  # speech was detected ...
    assert not result.has_speech  # ... but not enough of it to pass
