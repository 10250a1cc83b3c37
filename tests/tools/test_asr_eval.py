"""tools/asr_eval.py: the bare-versus-pipeline accuracy comparison runs end to end in its smoke size and
computes the comparison from its rows (no figure is asserted: those belong in BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.asr_eval import corpus_wer, real_clips, spell_number, summarise, word_errors
from tools.paths import REPO, child_env


def test_word_errors_count_substitutions_insertions_and_deletions() -> None:
    assert word_errors("Turn on the lamp.", "turn on the lamp") == (0, 4)
    assert word_errors("turn on the lamp", "turn of the lamp please") == (2, 4)
    assert word_errors("turn on the lamp", "") == (4, 4)
    assert corpus_wer([("a b c d", "a b c d"), ("e f", "e g")]) == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    ("token", "words"),
    [
        ("0", "zero"),
        ("8", "eight"),
        ("10", "ten"),
        ("42", "forty two"),
        ("150", "one hundred fifty"),
        ("300", "three hundred"),
        ("007", "007"),
        ("1000", "1000"),
        ("ten", "ten"),
    ],
)
def test_numerals_are_scored_as_words(token: str, words: str) -> None:
    assert spell_number(token) == words


def test_eight_of_spades_scores_like_8_of_spades() -> None:
    assert word_errors("eight of spades", "8 of spades.") == (0, 3)


def test_every_listed_clip_is_found_with_its_reference() -> None:
    clips = real_clips()
    labels = {c.label for c in clips}
    assert len(clips) > 300  # the digits, the read speech, the commands and both stereo channels
    assert {
        "asr_whisper_jfk/stereo_diarization.wav#left",
        "asr_whisper_jfk/stereo_diarization.wav#right",
    } <= labels
    assert all(c.reference and c.audio.duration_s > 0 for c in clips)


def test_smoke_run_writes_the_comparison(tmp_path: Path) -> None:
    out = tmp_path / "asr-eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.asr_eval", "--smoke", "--json", str(out)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    document = json.loads(out.read_text())
    assert proc.returncode == (0 if all(document["passes"].values()) else 1), proc.stderr
    assert document["smoke"] is True
    clips, queries = document["clip_rows"], document["query_rows"]
    assert document["clips"]["count"] == len(clips) > 0
    assert document["queries"]["count"] == len(queries) == 3
    for summary, rows in ((document["clips"], clips), (document["queries"], queries)):
        bare = corpus_wer([(r["reference"], r["bare"]) for r in rows])
        pipe = corpus_wer([(r["reference"], r["pipeline"]) for r in rows])
        assert summary["bare_wer"] == pytest.approx(bare)
        assert summary["pipeline_wer"] == pytest.approx(pipe)
        assert summary["delta_points"] == pytest.approx((pipe - bare) * 100)
        assert all(set(r) >= {"label", "audio_s", "bare", "pipeline", "words"} for r in rows)
    changed = sum(r["bare_decision"] != r["pipeline_decision"] for r in queries)
    assert document["queries"]["changed_decisions"] == changed
    assert document["passes"]["clip_wer"] == (document["clips"]["delta_points"] <= 1.0)
    # Each query is transcribed bare a second time, 0.1 s later: how much bare moves on its own.
    shifted = document["queries"]["bare_shifted"]
    assert shifted["count"] == len(queries)
    assert all(r["bare_shifted"] is not None for r in queries)
    assert shifted["changed_decisions"] == sum(
        r["bare_decision"] != r["bare_shifted_decision"] for r in queries
    )
    agreement = document["queries"]["reference_agreement"]
    for who in ("bare", "pipeline"):
        assert agreement[who] == sum(r[f"{who}_decision"] == r["reference_decision"] for r in queries)
    assert document["passes"]["decisions_vs_typed"] == (agreement["pipeline"] >= agreement["bare"] - 0.03)
    assert "real clips" in proc.stdout
    again = summarise(json.loads(out.read_text()))  # re-scoring stored transcripts gives the same figures
    assert again["clips"] == document["clips"] and again["queries"] == document["queries"]
