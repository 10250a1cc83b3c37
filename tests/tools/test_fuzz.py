"""The Ingest fuzz harness (tools/fuzz.py): a bounded run in process, and proof that it notices a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tools.fuzz as fuzz
from sotto.server.validation import validate_batch


def test_bounded_fuzz_run_finds_no_crash_and_no_row_for_a_refused_batch(tmp_path: Path) -> None:
    summary = fuzz.run(20_000, seed_value=20260301, db=tmp_path / "fuzz.db", mutants_per_case=15)
    assert summary["cases"] == 20_000
    assert summary["crashes"] == 0, summary["first_crashes"]
    assert summary["violations"] == 0, summary["first_violations"]
    assert summary["rows_for_refused_batches"] == 0
    assert summary["signals_not_acknowledged"] == 0
    assert summary["signals_before_retention"] == 0
    outcomes = summary["outcomes"]
    assert isinstance(outcomes, dict)
    # Every path was reached: parse errors, validation errors, applied batches, resends and id conflicts.
    assert {"unparseable", "invalid", "applied", "duplicate", "conflict"} <= set(outcomes)
    assert not fuzz.failed(summary)


def test_the_harness_reports_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(msg, config):  # type: ignore[no-untyped-def]
        if msg.region != "US":
            raise KeyError("a bug")
        return validate_batch(msg, config)

    monkeypatch.setattr(fuzz, "validate_batch", broken)
    summary = fuzz.run(300, seed_value=1, db=tmp_path / "fuzz.db", mutants_per_case=0)
    assert summary["crashes"] > 0
    assert fuzz.failed(summary)


def test_the_command_prints_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz.main(["--cases", "320", "--seed", "3", "--mutants", "31"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cases"] == 320
    assert summary["crashes"] == 0
