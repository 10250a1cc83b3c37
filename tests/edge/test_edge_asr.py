"""sotto.edge.asr with the real faster-whisper tiny.en: transcripts, and refusing unpinned models."""

from __future__ import annotations

import hashlib
import json
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
    repeats_itself,
    resolve_model,
    return_large_buffers_to_the_system,
    sha256_file,
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


LAMP_WAV = JFK_WAV.parents[1] / "asr_rhasspy_commands" / "turn_on_the_living_room_lamp.wav"


def test_fitted_window_is_the_speech_plus_margin_with_a_floor(transcriber: Transcriber) -> None:
    assert transcriber.options.window == "fit"
    assert transcriber.window_frames(3 * 16_000) == 1000  # the 10 s floor
    assert transcriber.window_frames(int(12.34 * 16_000)) == 1400  # 12.34 s + 1 s, whole seconds
    assert transcriber.window_frames(29 * 16_000) is None  # as long as Whisper's own window


def test_fitted_window_gives_the_full_window_transcript(transcriber: Transcriber) -> None:
    audio = load_audio(LAMP_WAV)
    before = transcriber.fallbacks
    fitted = transcriber.transcribe(audio)
    assert transcriber.fallbacks == before  # accepted without a second pass
    assert (
        words(fitted.text)
        == words(transcriber._transcribe_full(audio).text)
        == "turn on the living room lamp"
    )


def test_a_window_too_short_loops_and_falls_back_to_the_full_window(transcriber: Transcriber) -> None:
    # 4 s for a 3 s command: Whisper repeats the command ("Turn on the living room lamp Turn on the ...").
    audio = load_audio(LAMP_WAV)
    assert transcriber._transcribe_window(audio, 400) is None
    short = Transcriber(AsrOptions(min_window_s=0.5, window_margin_s=0.5))
    assert short.window_frames(len(audio.samples)) == 400
    assert words(short.transcribe(audio).text) == "turn on the living room lamp"
    assert short.fallbacks == 1


@pytest.mark.parametrize(
    ("text", "loops"),
    [
        ("Turn on the living room lamp Turn on the living room lamp Turn on the", True),
        ("go forward 10 meters. Go forward 10 meters.", True),
        ("3 3 3", True),
        (
            "And so my fellow Americans ask not what your country can do for you "
            "ask what you can do for your country.",
            False,
        ),
        ("no no", False),
        ("play it again", False),
    ],
)
def test_repetition_guard(text: str, loops: bool) -> None:
    assert repeats_itself(text) is loops


@pytest.mark.parametrize(
    "options",
    [
        AsrOptions(window="half"),
        AsrOptions(min_window_s=0),
        AsrOptions(min_window_s=31),
        AsrOptions(window_margin_s=-1),
    ],
)
def test_invalid_window_settings_are_refused(options: AsrOptions) -> None:
    with pytest.raises(ValueError, match="window"):
        Transcriber(options)


def test_int8_copy_is_prepared_once_verified_and_rebuilt_when_damaged(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = Transcriber(AsrOptions(cache_dir=str(cache)))
    (prepared,) = cache.glob("whisper-int8-*")
    assert prepared.name == f"whisper-int8-{BUNDLED_TINY_EN_SHA256[:16]}"
    model_bin = prepared / "model.bin"
    # int8 weights: about half the packaged float16 file.
    assert model_bin.stat().st_size < 0.6 * (bundled_model_dir() / "model.bin").stat().st_size
    audio = load_audio(LAMP_WAV)
    assert words(first.transcribe(audio).text) == "turn on the living room lamp"
    stamp = model_bin.stat().st_mtime_ns
    Transcriber(AsrOptions(cache_dir=str(cache)))  # reused as it is
    assert model_bin.stat().st_mtime_ns == stamp
    with model_bin.open("r+b") as fh:  # damage one byte of the weights
        fh.seek(model_bin.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    again = Transcriber(AsrOptions(cache_dir=str(cache)))
    assert (
        sha256_file(model_bin) == json.loads((prepared / "sotto-prepared.json").read_text())["model_sha256"]
    )
    assert words(again.transcribe(audio).text) == "turn on the living room lamp"


def test_empty_cache_dir_loads_the_packaged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOTTO_EDGE_CACHE", str(tmp_path / "unused"))
    plain = Transcriber(AsrOptions(cache_dir=""))
    assert not (tmp_path / "unused").exists()
    assert words(plain.transcribe(load_audio(LAMP_WAV)).text) == "turn on the living room lamp"


def test_large_buffers_go_back_to_the_system_on_glibc() -> None:
    import platform

    # CI and the devices run glibc Linux; elsewhere the call changes nothing and says so.
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert return_large_buffers_to_the_system() is expected
