"""The wearer's page (sotto.edge.transparency), as headless Chromium renders it."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from edge_testkit import DOGS, MUSIC, PROFILE, TODAY, AggregatorThread, run_edge

from sotto.edge import Device, LdpOptions
from sotto.edge.outbox import _SCHEMA, Outbox
from sotto.edge.pipeline import EdgeModels
from sotto.edge.privacy import DROP_REASONS
from sotto.edge.transparency import DROP_REASON_TEXT, render_page, write_page
from sotto.policy import Category, Policy, Taxonomy
from sotto.server import ServerConfig
from sotto.wire import Signal, day_number
from tools.browser import RenderedDom, dump_dom, png_size, screenshot

COMMERCIAL = "book me a flight to paris for next week"
SENSITIVE = "what are the side effects of my chemotherapy"
NO_INTEREST = "set an alarm for 6 am"
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>\"'&amp; ]]>"


def _rendered(page: Path) -> RenderedDom:
    return RenderedDom.parse(dump_dom(page))


def test_a_device_page_shows_what_left_what_never_left_and_the_controls(
    edge_models: EdgeModels, policy: Policy, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.db"
    with AggregatorThread(f"sqlite:///{tmp_path / 'agg.db'}", ServerConfig(policy=policy)) as aggregator:
        device = Device(
            PROFILE,
            "US",
            outbox=outbox,
            target=aggregator.target,
            models=edge_models,
            ldp=LdpOptions(epsilon=2.0, daily_budget=1),
        )
        try:
            first = device.hear_text(COMMERCIAL)
            second = device.hear_text(COMMERCIAL)  # over the budget of one signal a day
            assert first.noised and second.withheld >= 1
            assert device.hear_text(SENSITIVE).dropped.reason == "sensitive"  # type: ignore[union-attr]
            assert device.hear_text(NO_INTEREST).dropped.reason == "no_interest"  # type: ignore[union-attr]
            assert device.flush()
            sent = device.ledger()
            counters = device.outbox.stats().counters
            page = device.write_transparency_page(tmp_path / "page.html")
        finally:
            device.close()

    assert len(sent) == 1 and sent[0].epsilon == 2.0 and sent[0].noised
    source = page.read_text(encoding="utf-8")
    assert "chemotherapy" not in source and "paris" not in source  # counts only, never words
    assert counters["utterances_dropped_sensitive"] == 1 and not [c for c in counters if "health" in c]
    assert b"chemotherapy" not in outbox.read_bytes()
    dom = _rendered(page)
    text = dom.visible_text
    name = policy.taxonomy[sent[0].category_id].name
    assert f"{sent[0].date.day} {sent[0].date:%b %Y} Category Signals Sent {name}" in text
    assert "noised, ε = 2" in text and "1 of these 1 signals were noised (ε = 2)" in text
    assert "Interest signals: on" in text and "Deletion requested" not in text
    assert "Your glasses heard 4 requests; 2 of them produced an interest signal" in text
    assert f"{DROP_REASON_TEXT['sensitive']} 1" in text and f"{DROP_REASON_TEXT['no_interest']} 1" in text
    assert f"Withheld by the daily privacy budget (never sent) {second.withheld}" in text
    assert "Opt out." in text and "Delete your profile." in text
    # Self-contained: nothing that could fetch or run anything.
    assert not {"script", "img", "link", "iframe", "object", "embed"} & set(dom.tags)
    assert not [v for k, v in dom.attributes if k in ("src", "href") and v]

    shot = tmp_path / "page.png"
    assert screenshot(page, shot, width=412, height=900) == (412, 900)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank canvas


def test_every_string_on_the_page_is_escaped(tmp_path: Path) -> None:
    """A hostile category name (from a taxonomy file) and a hostile id (from the database) show as text."""
    taxonomy = Taxonomy({"666": Category("666", HOSTILE, None, HOSTILE)})
    with Outbox(tmp_path / "outbox.db") as box:
        box.add("US", [Signal("666", 4, day_number(TODAY)), Signal(MUSIC, 2, day_number(TODAY))])
        box.seal(PROFILE, batch_size=2)
        (batch,) = box.batches()
        box.acknowledge(batch.batch_id)
        with box._tx() as conn:  # as if the file had been tampered with
            conn.execute("UPDATE ledger SET category_id = ? WHERE category_id = ?", (HOSTILE, MUSIC))
        page = write_page(box, taxonomy, tmp_path / "page.html")
    dom = _rendered(page)
    assert not {"script", "img"} & set(dom.tags)
    assert not [k for k, _ in dom.attributes if k.startswith("on")]
    assert dom.visible_text.count(HOSTILE) == 3  # the name, its tier 1, and the unknown id


def test_a_pending_deletion_and_the_opt_out_are_shown(tmp_path: Path, policy: Policy) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        box.set_state("opted_out", "1")
        box.set_state("delete_pending", PROFILE)
        box.count_heard("opt_out")
        page = write_page(box, policy.taxonomy, tmp_path / "page.html")
    text = _rendered(page).visible_text
    assert "Interest signals: off (you opted out)" in text
    assert "Deletion requested, not yet confirmed" in text and "keep asking the service" in text
    assert "Nothing has been sent from these glasses." in text
    assert f"{DROP_REASON_TEXT['opt_out']} 1" in text


def test_count_heard_refuses_an_unknown_reason_and_counts_nothing(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        with pytest.raises(ValueError, match="unknown drop reason 'health'; expected one of sensitive"):
            box.count_heard("health")
        with pytest.raises(ValueError, match="withheld must be at least 0"):
            box.count_heard(None, -1)
        assert box.stats().get("utterances_heard") == 0
        for reason in DROP_REASONS:
            box.count_heard(reason)
        box.count_heard(None, withheld=3)
    with Outbox(tmp_path / "outbox.db") as box:  # persistent
        stats = box.stats()
        assert stats.get("utterances_heard") == len(DROP_REASONS) + 1
        assert all(stats.get(f"utterances_dropped_{r}") == 1 for r in DROP_REASONS)
        assert stats.get("utterances_kept") == 1 and stats.get("signals_withheld_budget") == 3


def test_a_ledger_written_before_epsilon_was_kept_says_so(tmp_path: Path, policy: Policy) -> None:
    path = tmp_path / "outbox.db"
    with closing(sqlite3.connect(path)) as conn:  # a version 1 outbox with one ledger entry
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO ledger (batch_id, position, category_id, weight_level, day, sent_at) "
            "VALUES (?, 0, ?, 2, ?, ?)",
            (b"\x01" * 16, DOGS, day_number(TODAY), time.time()),
        )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    with Outbox(path) as box:
        (entry,) = box.ledger()
        assert entry.epsilon is None and entry.noised is None
        text = RenderedDom.parse(render_page(box, policy.taxonomy)).visible_text
    assert "not recorded" in text


def test_ledger_html_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.add("US", [Signal(MUSIC, 4, day_number(TODAY))])
        box.seal(PROFILE, batch_size=1)
        box.acknowledge(box.batches()[0].batch_id)
    page = tmp_path / "wearer.html"
    proc = run_edge("ledger", "--outbox", str(path), "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {page}"
    text = _rendered(page).visible_text
    assert "Music" in text and "as heard" in text
    shot = tmp_path / "wearer.png"
    screenshot(page, shot)
    assert png_size(shot) == (412, 1200)


def test_ledger_html_of_a_device_that_never_sent_creates_no_outbox(tmp_path: Path) -> None:
    path = tmp_path / "none" / "outbox.db"
    page = tmp_path / "page.html"
    proc = run_edge("ledger", "--outbox", str(path), "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    assert not path.parent.exists() and "Nothing has been sent" in page.read_text(encoding="utf-8")


@pytest.mark.parametrize("extra", [["--json"], ["--clear"]])
def test_ledger_html_refuses_other_modes(tmp_path: Path, extra: list[str]) -> None:
    page = tmp_path / "page.html"
    proc = run_edge("ledger", "--outbox", str(tmp_path / "o.db"), "--html", str(page), *extra)
    assert proc.returncode == 2 and "--html cannot be combined" in proc.stderr
    assert not page.exists()


def test_ledger_html_into_a_folder_is_an_error(tmp_path: Path) -> None:
    proc = run_edge("ledger", "--outbox", str(tmp_path / "o.db"), "--html", str(tmp_path))
    assert proc.returncode == 2 and "is a folder" in proc.stderr


def test_every_drop_reason_is_explained_to_the_wearer() -> None:
    """A new drop reason must get the wearer's words before it can be counted on the page."""
    assert list(DROP_REASON_TEXT) == list(DROP_REASONS)
