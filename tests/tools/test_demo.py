"""tools/demo.sh and its pieces: the demo explains itself (heard beside merged, truth beside estimate), and
the emulator's HTML report renders in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tools.browser import RenderedDom, dump_dom, screenshot
from tools.demo_explain import Estimate, heard_and_sent, load_report
from tools.report_html import render_report_html, signal_outcomes, utterance_outcomes

ROOT = Path(__file__).resolve().parents[2]


def test_heard_and_sent_leaves_out_what_the_budget_withheld() -> None:
    analyses = [
        {
            "signals": [{"id": "a"}, {"id": "b"}, {"id": "c"}],
            "sent": [{"id": "x"}],
            "withheld_by_budget": 2,
        },
        {"signals": [{"id": "a"}], "sent": [{"id": "a"}], "withheld_by_budget": 0},
        {"signals": [], "sent": [], "withheld_by_budget": 0},
        {"signals": [{"id": "b"}]},  # local privacy off: no "sent", what passed the filter was sent
    ]
    heard, sent = heard_and_sent(analyses)
    assert heard == {"a": 2, "b": 1} and sent == {"x": 1, "a": 1, "b": 1}


def test_an_estimate_holds_the_truth_only_inside_its_interval() -> None:
    assert Estimate("1", "n", 10, 3, 12.0, 2.0, 22.0).covered is True
    assert Estimate("1", "n", 30, 3, 12.0, 2.0, 22.0).covered is False
    assert Estimate("1", "n", 30, 3, None, None, None).covered is None


def test_a_file_that_is_not_a_report_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text('{"devices": 3}', encoding="utf-8")
    with pytest.raises(ValueError, match="no 'analyses'; run the emulator with --report"):
        load_report(bad)


def _summary(**extra: Any) -> dict[str, Any]:
    summary = {
        "mode": "text",
        "devices": 2,
        "utterances": 10,
        "signals_produced": 7,
        "ldp_epsilon": 2.0,
        "signals_withheld_by_budget": 1,
        "signals_sent": 6,
        "batches_sent": 2,
        "batches_pending": 0,
        "outbox": {"signals_acknowledged": 6, "signals_set_aside": 0, "queued_signals": 0},
        "dropped": {"sensitive": 3, "no_interest": 2},
        "bytes_per_signal": 9.5,
        "pipeline_ms_p50": 12.0,
        "pipeline_ms_p95": 20.0,
        "ingest_ms_p50": 3.0,
        "ingest_ms_p99": 9.0,
        "stages_ms": {"classify": {"p50": 11.0, "p95": 18.0}, "filter": {"p50": 0.01, "p95": 0.02}},
        "wall_s": 1.5,
    }
    summary.update(extra)
    return summary


def test_the_report_counts_signals_and_utterances_by_outcome() -> None:
    assert signal_outcomes(_summary())["acknowledged"] == 6
    assert signal_outcomes(_summary())["withheld by the daily budget"] == 1
    assert utterance_outcomes(_summary()) == {
        "yielded signals": 5,
        "dropped: sensitive": 3,
        "dropped: no_interest": 2,
    }


def test_the_report_page_renders_with_its_plot_and_escapes_what_it_shows(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_report_html(_summary(mode="<b onmouseover=x>text</b>")), encoding="utf-8")
    dom = RenderedDom.parse(dump_dom(page))
    text = dom.visible_text
    assert "mode <b onmouseover=x>text</b>" in text and "b" not in dom.tags
    assert "pipeline latency p50 / p95 12.0 ms / 20.0 ms" in text
    assert "classify 11.0 ms 18.0 ms" in text
    (src,) = [v for k, v in dom.attributes if k == "src"]
    assert src is not None and src.startswith("data:image/png;base64,")  # the plot, embedded
    assert dom.tags.count("img") == 1 and "script" not in dom.tags
    shot = tmp_path / "report.png"
    assert screenshot(page, shot, width=1100, height=900) == (1100, 900)


def _run_demo(tmp_path: Path) -> tuple[str, Path]:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "SOTTO_DEMO_NO_SETUP": "1",
        "SOTTO_DEMO_FLEET": "24",
        "SOTTO_DEMO_PER_DEVICE": "8",
        "SOTTO_DEMO_OUT": str(out),
        "SOTTO_VENV": str(Path(os.environ.get("VIRTUAL_ENV") or ROOT / ".venv")),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "demo.sh"), "--text", "--no-clips"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out


def test_the_demo_explains_itself(tmp_path: Path) -> None:
    """The demo end to end (text only, a fleet of 24): every part says what it shows."""
    stdout, out = _run_demo(tmp_path)
    # Part 1: for each pair of glasses, what it heard beside what it sent and what the aggregator merged.
    for device in ("emulated-device-0001", "emulated-device-0002", "emulated-device-0003"):
        block = stdout.split(f"\n{device}: 16 utterances\n")[1]
        lines = block.splitlines()[:3]
        assert [line.split("  ")[1] for line in lines] == [
            "heard (before noise)",
            "sent (after noise)",
            "aggregator's profile",
        ]
    assert "each signal keeps its true category with probability 7.7%" in stdout
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    heard, _ = heard_and_sent(report["analyses"]["emulated-device-0001"])
    assert heard and report["ldp_epsilon"] == 2.0
    # Part 2: truth beside the de-biased estimate and its interval, for categories heard and never heard.
    assert "== Part 2: a fleet of 24 pairs of glasses, 8 queries each, epsilon 2 ==" in stdout
    header = next(line for line in stdout.splitlines() if "95% interval" in line)
    assert header.split() == [
        "category",
        "truth",
        "arrived",
        "as",
        "estimate",
        "95%",
        "interval",
        "holds",
        "truth",
    ]
    rows = stdout.split(header)[1].strip().split("\n\n")[0].splitlines()
    assert len(rows) == 8 + 3
    assert re.search(r"\d+ of \d+ intervals hold the truth", stdout)
    fleet = json.loads((out / "fleet.json").read_text(encoding="utf-8"))
    assert fleet["devices"] == 24 and fleet["signals_sent"] > 0
    # The reports: the emulator's summaries and the first wearer's page render in Chromium.
    for name, expected in (
        ("report.html", "Sotto device emulator: summary"),
        ("fleet.html", "devices 24"),
        ("wearer.html", "What left your glasses"),
    ):
        assert expected in RenderedDom.parse(dump_dom(out / name)).visible_text, name
