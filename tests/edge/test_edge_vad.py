"""sotto.edge.vad with the real Silero model: only speech may reach ASR (tiny Whisper invents text)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from edge_testkit import JFK_WAV, SPOKEN_DIGIT_WAV, chords

from sotto.edge.audio import SAMPLE_RATE, Audio, load_audio
from sotto.edge.pipeline import Pipeline
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


def test_quiet_music_crossing_the_threshold_for_a_moment_is_not_speech(speech_gate: SpeechGate) -> None:
    # Soft chords make the detector cross its threshold for a single 32 ms window: only the minimum
    # speech duration keeps that from reaching Whisper.
    audio = Audio(chords(seconds_each=1.0, amplitude=0.03))
    no_minimum = SpeechGate(SpeechGateOptions(min_speech_ms=0, min_total_speech_ms=0))
    assert no_minimum.detect(audio).has_speech

    result = speech_gate.detect(audio)

    assert not result.has_speech and result.segments == []


def test_one_short_spoken_word_is_speech(speech_gate: SpeechGate) -> None:
    audio = load_audio(SPOKEN_DIGIT_WAV)
    assert audio.duration_s < 0.3

    result = speech_gate.detect(audio)

    assert result.has_speech and result.speech is not None
    # The gate's earlier minimums (250 ms of speech, 300 ms in total) dropped this recording.
    earlier = SpeechGate(SpeechGateOptions(min_speech_ms=250, min_total_speech_ms=300))
    assert not earlier.detect(audio).has_speech


def test_a_one_word_query_reaches_asr_and_is_heard(pipeline: Pipeline) -> None:
    analysis = pipeline.analyze_file(SPOKEN_DIGIT_WAV)

    assert analysis.dropped is None or analysis.dropped.reason != "no_speech"
    assert analysis.transcript is not None
    assert analysis.transcript.strip(" .!").lower() in {"three", "3"}
