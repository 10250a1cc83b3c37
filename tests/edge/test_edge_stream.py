"""edge.stream: a real recording pushed frame by frame gives the analysis the offline pipeline gives, as
soon as the speech gate has seen the end of the speech."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from edge_testkit import LIBRISPEECH_FLAC, TODAY, run_cli

from sotto.edge.audio import SAMPLE_RATE, Audio, load_audio, pcm16_to_audio
from sotto.edge.pipeline import Analysis, EdgeModels, Pipeline
from sotto.edge.stream import FRAME_BYTES, UtteranceStream, analyze_pcm, audio_to_pcm
from tools.paths import SPEECH

LAMP = SPEECH / "asr_rhasspy_commands" / "turn_on_the_living_room_lamp.wav"


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * SAMPLE_RATE) * 2)


def same(streamed: Analysis, offline: Analysis) -> None:
    assert streamed.transcript == offline.transcript
    assert streamed.signals == offline.signals
    assert streamed.dropped == offline.dropped


def push_all(stream: UtteranceStream, pcm: bytes, frame: int = FRAME_BYTES) -> list[tuple[int, Analysis]]:
    """Push ``pcm`` frame by frame (faster than real time); (bytes pushed so far, analysis) per result."""
    out = []
    for start in range(0, len(pcm), frame):
        for result in stream.push(pcm[start : start + frame], today=TODAY):
            out.append((start + frame, result))
    return out


def test_a_clip_streamed_frame_by_frame_equals_the_offline_analysis(pipeline: Pipeline) -> None:
    speech = audio_to_pcm(load_audio(LAMP))
    pcm = speech + silence(2.0)
    offline = pipeline.analyze_audio(pcm16_to_audio(pcm), today=TODAY)
    assert offline.transcript and "lamp" in offline.transcript.lower()
    results = push_all(UtteranceStream(pipeline), pcm)
    assert len(results) == 1
    pushed, streamed = results[0]
    same(streamed, offline)
    # Returned once the gate saw the speech end (the clip itself ends in silence, so that can be before
    # its last byte), well before the 2 s of silence after it were all pushed.
    assert pushed < len(speech) + 2 * SAMPLE_RATE  # bytes: less than 1 s after the clip


def test_frame_size_does_not_change_the_result(pipeline: Pipeline) -> None:
    pcm = audio_to_pcm(load_audio(LAMP)) + silence(1.5)
    odd = push_all(UtteranceStream(pipeline), pcm, frame=998)  # not a multiple of the detector's window
    even = push_all(UtteranceStream(pipeline), pcm, frame=4096)
    assert len(odd) == len(even) == 1
    same(odd[0][1], even[0][1])


def test_two_utterances_are_answered_one_by_one(pipeline: Pipeline) -> None:
    lamp, read = audio_to_pcm(load_audio(LAMP)), audio_to_pcm(load_audio(LIBRISPEECH_FLAC))
    pcm = lamp + silence(1.5) + read + silence(1.5)
    results = [r for _, r in push_all(UtteranceStream(pipeline), pcm)]
    assert len(results) == 2
    assert "lamp" in (results[0].transcript or "").lower()
    assert "narrative" in (results[1].transcript or "").lower()
    offline_first = pipeline.analyze_audio(pcm16_to_audio(lamp + silence(1.5)), today=TODAY)
    same(results[0], offline_first)


def test_flush_answers_speech_that_was_cut_off(pipeline: Pipeline) -> None:
    pcm = audio_to_pcm(load_audio(LIBRISPEECH_FLAC))  # no pause in it closes an utterance
    stream = UtteranceStream(pipeline)
    cut = len(pcm) // 2 // 2 * 2
    assert push_all(stream, pcm[:cut]) == []
    assert stream.in_speech
    last = stream.flush(today=TODAY)
    assert last is not None and "reader" in (last.transcript or "").lower()
    assert not stream.in_speech and stream.flush(today=TODAY) is None


def test_long_speech_is_closed_at_the_cap(pipeline: Pipeline) -> None:
    pcm = audio_to_pcm(load_audio(LIBRISPEECH_FLAC))  # 11.7 s without a pause that would close it
    results = push_all(UtteranceStream(pipeline, max_utterance_s=4.0), pcm)
    assert len(results) == 2  # at 4 s and 8 s; the rest waits for more audio or flush
    assert all(r.transcript for _, r in results)


def test_silence_gives_nothing_until_analyze_pcm_answers_no_speech(pipeline: Pipeline) -> None:
    assert push_all(UtteranceStream(pipeline), silence(3.0)) == []
    (only,) = analyze_pcm(pipeline, silence(3.0), today=TODAY)
    assert only.dropped is not None and only.dropped.reason == "no_speech"


def test_an_opted_out_wearer_is_not_listened_to(edge_models: EdgeModels) -> None:
    device = Pipeline(edge_models, region="US", opted_out=True)
    stream = UtteranceStream(device)
    pcm = audio_to_pcm(load_audio(LAMP)) + silence(1.5)
    assert push_all(stream, pcm) == []
    assert not stream.in_speech and stream.flush(today=TODAY) is None
    (only,) = analyze_pcm(device, pcm, today=TODAY)
    assert only.transcript is None and only.dropped is not None


def _until_pause(pipeline: Pipeline, pcm: bytes, pause_s: float) -> bytes:
    """``pcm`` cut ``pause_s`` after the end of its speech (as the speech gate finds it)."""
    segments = pipeline.models.speech_gate.detect(pcm16_to_audio(pcm)).segments
    end = segments[-1][1] - pipeline.models.config.speech_gate.speech_pad_ms * SAMPLE_RATE // 1000
    return pcm[: (end + int(pause_s * SAMPLE_RATE)) * 2]


def _from_speech(pipeline: Pipeline, pcm: bytes) -> bytes:
    """``pcm`` from the start of its speech (as the speech gate finds it)."""
    segments = pipeline.models.speech_gate.detect(pcm16_to_audio(pcm)).segments
    start = segments[0][0] + pipeline.models.config.speech_gate.speech_pad_ms * SAMPLE_RATE // 1000
    return pcm[start * 2 :]


def test_asr_starts_before_the_close_and_the_close_takes_its_transcript(pipeline: Pipeline) -> None:
    pcm = audio_to_pcm(load_audio(LAMP)) + silence(1.5)
    with UtteranceStream(pipeline) as stream:
        early = push_all(stream, pcm)
        assert (stream.early_used, stream.early_discarded) == (1, 0)
    with UtteranceStream(pipeline, early_asr=False) as stream:
        late = push_all(stream, pcm)
        assert (stream.early_used, stream.early_discarded) == (0, 0)
    assert len(early) == len(late) == 1
    assert early[0][0] == late[0][0]  # closed at the same frame
    same(early[0][1], late[0][1])
    same(early[0][1], pipeline.analyze_audio(pcm16_to_audio(pcm), today=TODAY))


def test_speech_after_the_early_start_discards_the_early_transcript(pipeline: Pipeline) -> None:
    """A pause long enough to start ASR early (0.6 s) but too short to close the utterance (0.7 s): the
    wearer goes on, the early transcript of the first half is thrown away, and the utterance is the
    whole of both halves, as offline."""
    lamp = audio_to_pcm(load_audio(LAMP))
    pcm = _until_pause(pipeline, lamp, 0.6) + _from_speech(pipeline, lamp) + silence(1.5)
    with UtteranceStream(pipeline) as stream:
        assert push_all(stream, _until_pause(pipeline, lamp, 0.6)) == []
        assert stream.in_speech and stream.early_pending
    with UtteranceStream(pipeline) as stream:
        results = push_all(stream, pcm)
        assert (stream.early_used, stream.early_discarded) == (1, 1)
    assert len(results) == 1
    (_, streamed) = results[0]
    assert (streamed.transcript or "").lower().count("lamp") == 2
    same(streamed, pipeline.analyze_audio(pcm16_to_audio(pcm), today=TODAY))


def test_opting_out_after_the_early_start_drops_the_utterance(edge_models: EdgeModels) -> None:
    """The early transcript is made while the wearer is opted in; the opt-out that comes before the close
    drops it unread, and the close never happens."""
    device = Pipeline(edge_models, region="US")
    lamp = audio_to_pcm(load_audio(LAMP))
    head = _until_pause(device, lamp, 0.6)
    with UtteranceStream(device) as stream:
        assert push_all(stream, head) == [] and stream.early_pending
        device.set_opt_out(True)
        assert push_all(stream, silence(1.5)) == []
        assert not stream.in_speech and not stream.early_pending
        assert (stream.early_used, stream.early_discarded) == (0, 1)
        assert stream.flush(today=TODAY) is None


def test_close_stops_the_worker_thread(pipeline: Pipeline) -> None:
    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("sotto-early-asr")]

    before = len(workers())
    stream = UtteranceStream(pipeline)
    push_all(stream, audio_to_pcm(load_audio(LAMP)) + silence(1.5))
    assert len(workers()) == before + 1
    stream.close()
    assert len(workers()) == before


@pytest.mark.parametrize("kwargs", [{"end_silence_ms": 100}, {"max_utterance_s": 0.5}, {"lead_s": -1.0}])
def test_bad_settings_are_rejected(pipeline: Pipeline, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        UtteranceStream(pipeline, **kwargs)  # type: ignore[arg-type]


def test_odd_pcm_is_rejected(pipeline: Pipeline) -> None:
    with pytest.raises(ValueError, match="even number"):
        analyze_pcm(pipeline, b"\x00\x01\x02")


def test_audio_to_pcm_round_trips() -> None:
    samples = np.array([0.0, 0.5, -0.5, 1.0, -1.0], dtype=np.float32)
    back = pcm16_to_audio(audio_to_pcm(Audio(samples))).samples
    np.testing.assert_allclose(back, np.clip(samples, -1, 32767 / 32768), atol=1 / 32768)


def test_cli_pcm_streams_a_recording_into_one_line_per_utterance(tmp_path: Path) -> None:
    raw = tmp_path / "two.raw"
    raw.write_bytes(audio_to_pcm(load_audio(LAMP)) + silence(1.5) + audio_to_pcm(load_audio(LAMP)))
    proc = run_cli("--pcm", raw)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all("lamp" in line.lower() for line in lines)
