"""sotto.edge.asr with the real faster-whisper tiny.en: transcripts, and refusing unpinned models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from edge_testkit import JFK_LINE, JFK_WAV, words

from sotto.edge.asr import (
    BUNDLED_TINY_EN_SHA256,
    COMPUTE_TYPES,
    AsrOptions,
    ModelError,
    Transcriber,
    bundled_model_dir,
    resolve_model,
)
from sotto.edge.audio import load_audio
from sotto.edge.vad import SpeechGate


def _fake_model_dir(tmp_path: Path, content: bytes = b"not really a CTranslate2 model\n") -> Path:
    folder = tmp_path / "whisper"
    folder.mkdir()
    (folder / "model.bin").write_bytes(content)
    return folder


def test_jfk_transcript(transcriber: Transcriber) -> None:
    transcript = transcriber.transcribe(load_audio(JFK_WAV))
    assert JFK_LINE in words(transcript.text)
    assert 0.0 <= transcript.no_speech_prob <= 1.0
    assert transcript.avg_logprob < 0.0


def test_jfk_transcript_of_gated_speech(transcriber: Transcriber, speech_gate: SpeechGate) -> None:
    """What the pipeline does: ASR sees only the speech the gate kept."""
    speech = speech_gate.detect(load_audio(JFK_WAV)).speech
    assert speech is not None
    assert JFK_LINE in words(transcriber.transcribe(speech).text)


def test_bundled_model_matches_its_pin() -> None:
    assert resolve_model(AsrOptions()) == bundled_model_dir()
    # resolve_model checked the hash; check it independently as well.
    digest = hashlib.sha256((bundled_model_dir() / "model.bin").read_bytes()).hexdigest()
    assert digest == BUNDLED_TINY_EN_SHA256


def test_resolve_model_refuses_sha256_mismatch(tmp_path: Path) -> None:
    folder = _fake_model_dir(tmp_path)
    with pytest.raises(ModelError, match="SHA-256") as info:
        resolve_model(AsrOptions(model_dir=str(folder), sha256="0" * 64))
    assert "model.bin" in str(info.value)


def test_transcriber_refuses_sha256_mismatch_before_loading(tmp_path: Path) -> None:
    folder = _fake_model_dir(tmp_path)
    with pytest.raises(ModelError, match="SHA-256"):
        Transcriber(AsrOptions(model_dir=str(folder), sha256="0" * 64))


def test_resolve_model_accepts_matching_sha256(tmp_path: Path) -> None:
    folder = _fake_model_dir(tmp_path)
    digest = hashlib.sha256((folder / "model.bin").read_bytes()).hexdigest()
    assert resolve_model(AsrOptions(model_dir=str(folder), sha256=digest)) == folder


def test_resolve_model_accepts_upper_case_sha256(tmp_path: Path) -> None:
    folder = _fake_model_dir(tmp_path)
    digest = hashlib.sha256((folder / "model.bin").read_bytes()).hexdigest().upper()
    assert resolve_model(AsrOptions(model_dir=str(folder), sha256=digest)) == folder


def test_directory_without_model_bin_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ModelError, match="no model.bin") as info:
        resolve_model(AsrOptions(model_dir=str(empty)))
    assert str(empty) in str(info.value)


def test_invalid_compute_type_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="float16") as info:
        Transcriber(AsrOptions(compute_type="float16"))
    for choice in COMPUTE_TYPES:
        assert choice in str(info.value)
