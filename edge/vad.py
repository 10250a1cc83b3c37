"""Speech gate: Silero VAD (the copy faster-whisper ships) decides whether an utterance has speech.

Tiny Whisper invents text on silence, noise and music ("Thank you."), so audio without speech must
never reach ASR. The gate also trims the audio to the speech it found, which shortens ASR time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sotto.edge.audio import SAMPLE_RATE, Audio


@dataclass(frozen=True, slots=True)
class SpeechGateOptions:
    """Options for the speech gate (see faster_whisper.vad.VadOptions for the detector's own)."""

    threshold: float = 0.5
    #: A stretch above the threshold shorter than this is not speech. Quiet music crosses the threshold
    #: for a single 32 ms window; a spoken digit ("three", "one") holds it for 100-250 ms, so a minimum
    #: of 250 ms dropped a fifth of the single-word recordings of shared/data (BENCHMARKS.md).
    min_speech_ms: int = 100
    min_silence_ms: int = 300
    speech_pad_ms: int = 200
    #: Less detected speech than this in total (padding included) means "no speech". A recording cut
    #: tightly around one short word has no room for padding: 0.25 s of it is a whole query.
    min_total_speech_ms: int = 100


@dataclass(frozen=True, slots=True)
class SpeechResult:
    """Speech regions found in an utterance, as sample ranges, and the speech-only audio."""

    segments: list[tuple[int, int]] = field(default_factory=list)
    speech: Audio | None = None

    @property
    def has_speech(self) -> bool:
        return self.speech is not None


class SpeechGate:
    """Voice activity detection in front of ASR."""

    def __init__(self, options: SpeechGateOptions | None = None) -> None:
        from faster_whisper.vad import VadOptions, get_vad_model

        self.options = options or SpeechGateOptions()
        self._vad_options = VadOptions(
            threshold=self.options.threshold,
            min_speech_duration_ms=self.options.min_speech_ms,
            min_silence_duration_ms=self.options.min_silence_ms,
            speech_pad_ms=self.options.speech_pad_ms,
        )
        get_vad_model()  # load the ONNX session now, not on the first utterance

    def detect(self, audio: Audio) -> SpeechResult:
        from faster_whisper.vad import get_speech_timestamps

        if audio.samples.size == 0:
            return SpeechResult()
        stamps = get_speech_timestamps(audio.samples, self._vad_options, sampling_rate=SAMPLE_RATE)
        segments = [(int(s["start"]), int(s["end"])) for s in stamps]
        total_ms = sum(end - start for start, end in segments) * 1000 / SAMPLE_RATE
        if total_ms < self.options.min_total_speech_ms:
            return SpeechResult(segments=segments)
        speech = np.concatenate([audio.samples[start:end] for start, end in segments])
        return SpeechResult(segments=segments, speech=Audio(speech))
