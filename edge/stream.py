"""Streaming audio for firmware: push PCM frames as they arrive, get each utterance's analysis as soon as
the speech gate sees that the wearer stopped talking.

The speech gate's detector (Silero VAD) runs on every 32 ms window as it arrives, carrying its recurrent
state, so it computes exactly the speech probabilities it would compute over the whole recording. An
utterance is closed once ``end_silence_ms`` of non-speech follow speech (longer than the gate's own
``min_silence_ms`` plus its padding, so a pause inside a sentence does not close it), or once it reaches
``max_utterance_s`` (the cap on what Whisper decodes at once). The closed utterance then goes through
:meth:`Pipeline.analyze_audio`, the same call an offline caller makes, so a recording streamed frame by
frame gives the analysis the same recording gives offline.

ASR starts before the close. Once ``min_silence_ms`` plus the padding of non-speech follow the speech,
the gate's segments can no longer change unless the wearer speaks again, so the stream transcribes the
speech so far on a worker thread (the device's spare core) while it waits out the rest of
``end_silence_ms``. At the close, :meth:`Pipeline.analyze_audio` runs the gate on the closed utterance as
always and takes that transcript only if the speech it finds is exactly the same audio; the wearer's
settings, the classifier and the filter are applied at the close. If the wearer speaks again first, the
early transcript is discarded (``early_discarded`` counts them: a transcription's worth of spare-core
work each). The result is the offline one either way; what changes is that, at the end of speech, little
or no ASR is left to do.

Nothing is buffered while the wearer is opted out or the region is blocked: frames are dropped unread.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from sotto.edge.audio import SAMPLE_RATE, Audio, AudioError, pcm16_to_audio
from sotto.edge.pipeline import Analysis, EarlyTranscript, Pipeline

#: The detector's window and the context it sees of the window before (Silero VAD v5/v6 at 16 kHz).
_WINDOW = 512
_CONTEXT = 64
#: A frame of 20 ms: what the CLI and the emulator push (firmware pushes whatever its callback gets).
FRAME_BYTES = 640


class UtteranceStream:
    """Cuts a live PCM stream (16 kHz mono int16 little-endian) into utterances and analyses each one.

    Call :meth:`push` from the audio callback with frames of any size; it returns the analyses of the
    utterances that frame completed (usually none). :meth:`flush` ends the stream (button released,
    glasses taken off) and analyses what speech is still buffered. Memory is bounded: at most
    ``lead_s`` of audio before speech and ``max_utterance_s`` of utterance are kept. With ``early_asr``
    (the default), transcription starts on a worker thread while the stream waits to be sure the wearer
    has stopped (module docstring); call :meth:`close` (or use the stream as a context manager) to stop
    that thread.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        label: str = "<pcm>",
        end_silence_ms: int = 700,
        max_utterance_s: float = 30.0,
        lead_s: float = 1.0,
        early_asr: bool = True,
    ) -> None:
        gate = pipeline.models.config.speech_gate
        if end_silence_ms < gate.min_silence_ms + gate.speech_pad_ms:
            raise ValueError(
                f"end_silence_ms must be at least the gate's min_silence_ms + speech_pad_ms "
                f"({gate.min_silence_ms + gate.speech_pad_ms}), got {end_silence_ms}"
            )
        if not 1.0 <= max_utterance_s <= 30.0 or not 0.0 <= lead_s <= 10.0:
            raise ValueError("max_utterance_s must be in [1, 30] and lead_s in [0, 10]")
        self.pipeline = pipeline
        self.label = label
        self._threshold = gate.threshold
        self._neg_threshold = max(gate.threshold - 0.15, 0.01)  # the detector's own hysteresis
        self._end_silence = end_silence_ms * SAMPLE_RATE // 1000
        self._max_samples = int(max_utterance_s * SAMPLE_RATE)
        self._lead = int(lead_s * SAMPLE_RATE) // _WINDOW * _WINDOW
        self._session: Any = None  # the detector's ONNX Runtime session, loaded with the gate
        settled = (gate.min_silence_ms + gate.speech_pad_ms) * SAMPLE_RATE // 1000
        self._early_at = settled if early_asr and settled < self._end_silence else None
        self._worker: ThreadPoolExecutor | None = None
        self._early: EarlyTranscript | None = None
        self._early_started = False
        #: Early transcripts the close took, and those thrown away (the wearer spoke again, or the speech
        #: at the close was not the same audio).
        self.early_used = 0
        self.early_discarded = 0
        self._reset()

    def _reset(self) -> None:
        self._pending = b""  # bytes of an incomplete window
        self._windows: list[np.ndarray] = []  # the current utterance (or lead-in), window by window
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._speaking = False
        self._silence = 0  # samples of non-speech since the speech last stopped
        self._discard_early()

    @property
    def in_speech(self) -> bool:
        """True while an utterance has started and not been closed."""
        return self._speaking

    @property
    def early_pending(self) -> bool:
        """True while a transcription started early waits for the utterance's close."""
        return self._early is not None

    def push(self, frame: bytes | bytearray | memoryview, today: dt.date | None = None) -> list[Analysis]:
        """Take one frame; return the analyses of the utterances it completed."""
        day = today or dt.datetime.now(dt.UTC).date()
        if self.pipeline.filter.gate(self.pipeline.region, day) is not None:
            self._reset()  # opted out or blocked region: the audio is not even looked at
            return []
        data = self._pending + bytes(frame)
        usable = len(data) - len(data) % (_WINDOW * 2)
        self._pending = data[usable:]
        if not usable:
            return []
        samples = pcm16_to_audio(data[:usable]).samples.reshape(-1, _WINDOW)
        probs = self._probabilities(samples)
        done: list[Analysis] = []
        for window, prob in zip(samples, probs, strict=True):
            self._windows.append(window)
            if prob >= self._threshold:
                if self._silence and self._early_started:
                    self._discard_early()  # the wearer spoke again: the early transcript is not the utterance
                self._speaking, self._silence = True, 0
            elif self._speaking and (self._silence or prob < self._neg_threshold):
                self._silence += _WINDOW
            if self._speaking and (
                self._silence >= self._end_silence or len(self._windows) * _WINDOW >= self._max_samples
            ):
                done.append(self._close(day))
            elif self._speaking:
                if self._early_at is not None and self._silence >= self._early_at and not self._early_started:
                    self._start_early()
            elif len(self._windows) * _WINDOW > self._lead:
                del self._windows[: len(self._windows) - self._lead // _WINDOW]
        return done

    def flush(self, today: dt.date | None = None) -> Analysis | None:
        """End of the stream: analyse the utterance in progress (None when no speech was going on)."""
        day = today or dt.datetime.now(dt.UTC).date()
        result = None
        if self._speaking and self.pipeline.filter.gate(self.pipeline.region, day) is None:
            if len(self._pending) >= 2:
                tail = pcm16_to_audio(self._pending[: len(self._pending) // 2 * 2]).samples
                self._windows.append(tail)
            result = self._close(day)
        self._reset()
        return result

    def close(self) -> None:
        """Stop the worker thread of early transcription (one under way finishes first, unread). The
        stream stays usable: the next early transcription starts a new thread."""
        self._discard_early()
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None

    def __enter__(self) -> UtteranceStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_early(self) -> None:
        """Transcribe the speech so far on the worker thread (the gate's segments are settled)."""
        self._early_started = True
        speech = self.pipeline.models.speech_gate.detect(Audio(np.concatenate(self._windows)))
        if speech.speech is None:
            return  # nothing the close would transcribe either
        transcriber = self.pipeline.models.transcriber
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sotto-early-asr")
        pending = self._worker.submit(transcriber.transcribe, speech.speech)
        self._early = EarlyTranscript(speech.speech, pending)

    def _discard_early(self) -> None:
        if self._early is not None:
            self._early.result.cancel()  # not started yet: never runs; under way: finishes, unread
            self.early_discarded += 1
        self._early, self._early_started = None, False

    def _close(self, day: dt.date) -> Analysis:
        audio = Audio(np.concatenate(self._windows))
        early, self._early, self._early_started = self._early, None, False
        self._windows = []
        self._speaking, self._silence = False, 0
        analysis = self.pipeline.analyze_audio(audio, label=self.label, today=day, early=early)
        if early is not None:
            if early.used:
                self.early_used += 1
            else:
                self.early_discarded += 1
        return analysis

    def _probabilities(self, windows: np.ndarray) -> np.ndarray:
        """Speech probability of each window, continuing the detector's state from the last call."""
        if self._session is None:
            from faster_whisper.vad import get_vad_model

            _ = self.pipeline.models.speech_gate  # the gate owns the detector's loading
            self._session = get_vad_model().session
        previous = np.concatenate([self._context[None, :], windows[:-1, -_CONTEXT:]], axis=0)
        batch = np.concatenate([previous, windows], axis=1)
        out, self._h, self._c = self._session.run(None, {"input": batch, "h": self._h, "c": self._c})
        self._context = windows[-1, -_CONTEXT:].copy()
        return np.asarray(out, dtype=np.float32).reshape(-1)


def analyze_pcm(
    pipeline: Pipeline,
    data: bytes,
    label: str = "<pcm>",
    today: dt.date | None = None,
    frame_bytes: int = FRAME_BYTES,
) -> list[Analysis]:
    """Analyse a PCM recording the way the device hears it: frame by frame through :class:`UtteranceStream`.

    A recording in which the gate finds no utterance still gets one analysis (no speech, or the reason
    the wearer's settings stopped it), so every input is answered.
    """
    if len(data) % 2:
        raise AudioError(f"PCM input has {len(data)} bytes; 16-bit samples need an even number of bytes")
    results: list[Analysis] = []
    with UtteranceStream(pipeline, label=label) as stream:
        for frame in _frames(data, frame_bytes):
            results += stream.push(frame, today)
        last = stream.flush(today)
    if last is not None:
        results.append(last)
    if not results:
        results.append(pipeline.analyze_audio(pcm16_to_audio(data), label=label, today=today))
    return results


def audio_to_pcm(audio: Audio) -> bytes:
    """16 kHz float samples as the int16 PCM firmware delivers (clipped to full scale)."""
    return (np.clip(audio.samples, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()


def _frames(data: bytes, size: int) -> Iterable[bytes]:
    if size < 2 or size % 2:
        raise ValueError(f"frame_bytes must be a positive even number, got {size}")
    for start in range(0, len(data), size):
        yield data[start : start + size]
