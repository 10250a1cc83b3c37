"""Audio in: files of any rate and channel count, or raw PCM frames pushed by firmware.

Everything leaves this module as float32 mono at 16 kHz in [-1, 1], the only format later stages accept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
_BYTES_PER_SAMPLE = 2  # int16


class AudioError(ValueError):
    """The input is not audio this device can read."""


@dataclass(frozen=True, slots=True)
class Audio:
    """Mono float32 samples at :data:`SAMPLE_RATE`."""

    samples: np.ndarray

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def load_audio(path: str | os.PathLike[str]) -> Audio:
    """Decode an audio file (WAV, FLAC, and anything else FFmpeg reads), downmixed and resampled.

    Raises :class:`AudioError` naming the file when it is missing, empty or not audio.
    """
    # PyAV ships with faster-whisper; its decoder handles every container and sample format and
    # resamples in one pass, so no second audio library is needed on the device.
    from faster_whisper.audio import decode_audio

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise AudioError(f"{name}: no such audio file")
    try:
        samples = decode_audio(name, sampling_rate=SAMPLE_RATE)
    except Exception as exc:  # PyAV raises a family of FFmpeg errors; the caller needs only the cause.
        raise AudioError(f"{name}: not a readable audio file ({type(exc).__name__}: {exc})") from None
    if not isinstance(samples, np.ndarray) or samples.size == 0:
        raise AudioError(f"{name}: contains no audio samples")
    return Audio(np.ascontiguousarray(samples, dtype=np.float32))


def probe_duration(path: str | os.PathLike[str]) -> float | None:
    """The duration of an audio file in seconds from its header, without decoding it (None: the header
    does not say); :class:`AudioError` when it is not a readable audio file."""
    import av

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise AudioError(f"{name}: no such audio file")
    try:
        with av.open(name, metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError(f"{name}: contains no audio stream")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except AudioError:
        raise
    except Exception as exc:  # PyAV raises a family of FFmpeg errors; the caller needs only the cause.
        raise AudioError(f"{name}: not a readable audio file ({type(exc).__name__}: {exc})") from None
    return None


def pcm16_to_audio(frames: bytes | bytearray | memoryview) -> Audio:
    """Convert raw little-endian 16 kHz mono int16 PCM (as firmware delivers it) to :class:`Audio`."""
    data = bytes(frames)
    if len(data) % _BYTES_PER_SAMPLE:
        raise AudioError(f"PCM input has {len(data)} bytes; 16-bit samples need an even number of bytes")
    pcm = np.frombuffer(data, dtype="<i2")
    return Audio(pcm.astype(np.float32) / 32768.0)


class PcmStream:
    """Collects PCM frames pushed by firmware until the end of an utterance.

    Firmware calls :meth:`push` from its audio callback with whatever frame size it uses, then
    :meth:`finish` when its button or wake-word logic says the query ended. The buffer is bounded so
    that a stuck microphone cannot grow memory without limit.
    """

    def __init__(self, max_seconds: float = 30.0) -> None:
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        self._max_bytes = int(max_seconds * SAMPLE_RATE) * _BYTES_PER_SAMPLE
        self._buf = bytearray()
        self.truncated = False

    def push(self, frame: bytes | bytearray | memoryview) -> None:
        room = self._max_bytes - len(self._buf)
        chunk = bytes(frame)
        if len(chunk) > room:
            chunk = chunk[: room - room % _BYTES_PER_SAMPLE]
            self.truncated = True
        self._buf += chunk

    def finish(self) -> Audio:
        """Return the utterance and reset the buffer (and ``truncated``) for the next one.

        Read ``truncated`` before calling this to know whether the utterance was cut.
        """
        data = bytes(self._buf)
        if len(data) % _BYTES_PER_SAMPLE:
            data = data[:-1]
        self._buf.clear()
        self.truncated = False
        return pcm16_to_audio(data)
