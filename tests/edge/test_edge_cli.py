"""`python -m sotto.edge analyze` as a real process: the JSON-lines contract and its exit codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from edge_testkit import JFK_LINE, JFK_WAV, run_cli, words

from sotto.edge.privacy import DROP_REASONS

COMMERCIAL = "book me a flight to paris for next week"


def _lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _check_shape(doc: dict[str, Any]) -> None:
    assert set(doc) == {"input", "transcript", "signals", "dropped"}
    assert isinstance(doc["input"], str)
    assert doc["transcript"] is None or isinstance(doc["transcript"], str)
    assert isinstance(doc["signals"], list)
    for item in doc["signals"]:
        assert set(item) == {"id", "name", "tier1", "weight"}
        assert (
            isinstance(item["id"], str) and isinstance(item["name"], str) and isinstance(item["tier1"], str)
        )
        assert item["weight"] in (0.25, 0.5, 0.75, 1.0)
    if doc["dropped"] is None:
        assert doc["signals"], "neither signals nor a reason"
    else:
        assert set(doc["dropped"]) == {"reason", "detail"}
        assert doc["dropped"]["reason"] in DROP_REASONS
        assert doc["signals"] == []


def _check_usage_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("sotto-edge: error:")
    for needle in needles:
        assert needle in proc.stderr


def test_text_json_prints_exactly_one_contract_line() -> None:
    proc = run_cli("--text", COMMERCIAL, "--json")
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1
    (doc,) = _lines(proc)
    _check_shape(doc)
    assert doc["input"] == COMMERCIAL
    assert doc["dropped"] is None
    assert doc["signals"][0]["tier1"] == "Travel"


def test_text_file_prints_one_line_per_query(tmp_path: Path) -> None:
    queries = tmp_path / "queries.txt"
    queries.write_text(
        f"{COMMERCIAL}\n\nset an alarm for 6 am\nwhat are the side effects of my chemotherapy\n",
        encoding="utf-8",
    )
    docs = _lines(run_cli("--text-file", queries))
    assert len(docs) == 3  # the blank line is not a query
    for doc in docs:
        _check_shape(doc)
    assert [d["input"] for d in docs] == [
        COMMERCIAL,
        "set an alarm for 6 am",
        "what are the side effects of my chemotherapy",
    ]
    assert docs[0]["dropped"] is None
    assert docs[1]["dropped"]["reason"] == "no_interest"
    assert docs[2]["dropped"] == {"reason": "sensitive", "detail": "health"}


def test_audio_prints_a_transcript() -> None:
    (doc,) = _lines(run_cli("--audio", JFK_WAV))
    _check_shape(doc)
    assert doc["input"] == str(JFK_WAV)
    assert JFK_LINE in words(doc["transcript"])


def test_blocked_region_is_dropped() -> None:
    (doc,) = _lines(run_cli("--text", COMMERCIAL, "--region", "DE", "--json"))
    _check_shape(doc)
    assert doc["dropped"]["reason"] == "region"
    assert doc["transcript"] is None


def test_missing_audio_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    _check_usage_error(run_cli("--text", COMMERCIAL, "--audio", missing), str(missing), "no such audio file")


def test_non_utf8_text_file_is_a_usage_error(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 near me\nwhere can i buy shoes\n".encode("latin-1"))
    _check_usage_error(run_cli("--text-file", latin1), str(latin1), "UTF-8")


def test_no_input_is_a_usage_error() -> None:
    _check_usage_error(run_cli(), "nothing to analyse")


@pytest.mark.parametrize("region", ["USA", "1x"])
def test_bad_region_is_a_usage_error(region: str) -> None:
    _check_usage_error(run_cli("--text", COMMERCIAL, "--region", region), "alpha-2")


def test_unreadable_audio_fails_that_item_only(tmp_path: Path) -> None:
    fake = tmp_path / "x.wav"
    fake.write_text("not audio\n")
    proc = run_cli("--text", COMMERCIAL, "--audio", fake)
    assert proc.returncode == 1
    assert "x.wav" in proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["input"] for d in docs] == [COMMERCIAL]


def test_show_noised_adds_what_would_be_sent_and_keeps_the_contract() -> None:
    texts = [COMMERCIAL, "i need a doctor for my back pain", "where can i buy running shoes"]
    args = [a for t in texts for a in ("--text", t)]
    plain = _lines(run_cli(*args))
    noised = _lines(run_cli(*args, "--show-noised", "--ldp-epsilon", "1.5", "--daily-budget", "1"))
    for doc in plain:
        _check_shape(doc)
    for before, after in zip(plain, noised, strict=True):
        # The filter's decision is reported exactly as without the flag, before any noise.
        assert {k: after[k] for k in ("input", "transcript", "signals", "dropped")} == before
        assert set(after) == {"input", "transcript", "signals", "dropped", "sent", "withheld_by_budget"}
        for item in after["sent"]:
            assert set(item) == {"id", "name", "tier1", "weight", "epsilon"}
            assert item["weight"] == 1.0 and item["epsilon"] == 1.5
    first, sensitive, third = noised
    assert len(first["sent"]) == 1 and first["withheld_by_budget"] == len(first["signals"]) - 1
    assert sensitive["sent"] == [] and sensitive["withheld_by_budget"] == 0  # a drop is never noised in
    assert third["sent"] == [] and third["withheld_by_budget"] == len(third["signals"])  # budget spent


def test_minor_flag_drops_every_query() -> None:
    (doc,) = _lines(run_cli("--text", COMMERCIAL, "--minor"))
    _check_shape(doc)
    assert doc["dropped"]["reason"] == "minor" and doc["transcript"] is None


@pytest.mark.parametrize("args", [["--ldp-epsilon", "0"], ["--ldp-epsilon", "11"], ["--daily-budget", "0"]])
def test_bad_ldp_settings_are_usage_errors(args: list[str]) -> None:
    proc = run_cli("--text", COMMERCIAL, "--show-noised", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "epsilon" in proc.stderr or "budget" in proc.stderr
