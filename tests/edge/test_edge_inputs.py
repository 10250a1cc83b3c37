"""Bounds on what the device reads (issue finding 13): Unicode format characters resolved before
classifying, one query per "\\n" line, and no utterance longer than the longest one analysed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from edge_testkit import REPO, run_cli, write_wav

from sotto.edge.audio import SAMPLE_RATE, Audio
from sotto.edge.pipeline import MAX_UTTERANCE_S, Pipeline
from sotto.edge.text import normalize_text, readings, visual_order

RLO, PDF = "\u202e", "\u202c"


def test_format_characters_are_resolved_or_removed() -> None:
    assert visual_order(f"buy {RLO}seohs gninnur{PDF} today") == "buy running shoes today"
    # Zero-width space and joiner, soft hyphen.
    assert normalize_text("dep\u200bress\u200dion\u00ad pills") == "depression pills"
    assert normalize_text("one\u2028two\x1cthree\u2029four") == "one two three four"  # one query, not four
    assert normalize_text("ｆｕｌｌｗｉｄｔｈ") == "fullwidth"  # NFKC
    assert readings(f"{RLO}abc{PDF}") == ["cba", "abc"]  # shown and stored order, both classified
    assert readings("plain text") == ["plain text"]
    assert len(normalize_text("a " * 10_000)) == 2000


def _sensitive_queries(n: int) -> list[str]:
    rows: list[str] = []
    for path in sorted((REPO / "tools" / "data" / "handwritten").glob("sensitive_queries_*.tsv")):
        with path.open(encoding="utf-8", newline="") as fh:
            rows += [r["text"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[:: max(1, len(rows) // n)][:n]


def test_reversed_text_inside_a_right_to_left_override_stays_dropped(pipeline: Pipeline) -> None:
    # The attack: each sensitive query typed backwards inside U+202E, so it displays as written. Before,
    # 15 of 300 came through with signals. Each must fare no better than the plain query.
    through = []
    for query in _sensitive_queries(300):
        plain = pipeline.analyze_text(query)
        attacked = pipeline.analyze_text(f"{RLO}{query[::-1]}{PDF}")
        assert attacked.input == normalize_text(query)  # printed as a person reads it, no raw override
        sensitive = plain.dropped is not None and plain.dropped.reason == "sensitive"
        if sensitive and (attacked.dropped is None or attacked.dropped.reason != "sensitive"):
            through.append(query)
        # Zero-width characters between the letters hide nothing either.
        hidden = pipeline.analyze_text("\u200b".join(query))
        if sensitive:
            assert hidden.dropped is not None and hidden.dropped.reason == "sensitive", query
    assert through == []


def test_a_text_file_is_split_on_newlines_only(tmp_path: Path) -> None:
    path = tmp_path / "queries.txt"
    path.write_text(
        "book me a flight\u2028to paris\nwhere can i buy\x1ctrail running shoes\r\n\n", encoding="utf-8"
    )
    proc = run_cli("--text-file", path)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["input"] for d in docs] == ["book me a flight to paris", "where can i buy trail running shoes"]


def test_an_utterance_longer_than_the_cap_is_dropped_before_it_is_decoded(tmp_path: Path) -> None:
    ten_minutes = 600 * SAMPLE_RATE
    rng = np.random.default_rng(13)
    pcm = tmp_path / "noise.pcm"
    pcm.write_bytes((rng.integers(-3000, 3000, ten_minutes, dtype="<i2")).tobytes())
    noise = rng.uniform(-0.1, 0.1, ten_minutes).astype(np.float32)
    wav = write_wav(tmp_path / "noise.wav", noise, SAMPLE_RATE)
    proc = run_cli("--pcm", pcm, "--audio", wav)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["dropped"]["reason"] for d in docs] == ["too_long", "too_long"]
    assert all("600.0 s of audio" in d["dropped"]["detail"] and d["transcript"] is None for d in docs)


def test_a_long_utterance_handed_over_in_memory_is_dropped(pipeline: Pipeline) -> None:
    audio = Audio(np.zeros(int((MAX_UTTERANCE_S + 1) * SAMPLE_RATE), dtype=np.float32))
    result = pipeline.analyze_audio(audio)
    assert result.dropped is not None and result.dropped.reason == "too_long"


@pytest.mark.parametrize("seconds", [1.0, MAX_UTTERANCE_S - 0.5])
def test_utterances_within_the_cap_are_analysed(pipeline: Pipeline, seconds: float) -> None:
    result = pipeline.analyze_audio(Audio(np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)))
    assert result.dropped is not None and result.dropped.reason == "no_speech"
