"""A damaged outbox, a lost side file, a flipped byte, a read-only look: what the device keeps and how it
fails closed (issue findings 9, 10, 11 and 12)."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest
from edge_testkit import DOGS, MUSIC, PROFILE, assert_outbox_balanced, free_port

from sotto.edge.cli import main as edge_main
from sotto.edge.client import DeliveryClient
from sotto.edge.ldp import DailyBudget
from sotto.edge.outbox import STATE_LOST_KEY, Outbox, OutboxError
from sotto.wire import Signal, day_number

DAY = day_number(__import__("datetime").date.today())


def _page_of(path: Path, table: str) -> tuple[int, int]:
    """(offset, size) of the root page of ``table`` in the file (its only page when it is small)."""
    with closing(sqlite3.connect(path)) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    return (root - 1) * size, size


def _client(path: Path) -> DeliveryClient:
    return DeliveryClient(PROFILE, "US", target=f"127.0.0.1:{free_port()}", outbox=path, batch_size=5)


# --- 9: an unreadable opt-out fails closed ------------------------------------------------------------


@pytest.mark.parametrize("half", ["first", "second"])
def test_an_opt_out_on_a_damaged_page_fails_closed(tmp_path: Path, half: str) -> None:
    path = tmp_path / "outbox.db"
    client = _client(path)
    client.add([Signal(MUSIC, 4, DAY)] * 12)
    assert client.set_opt_out(True) == 12
    client.close()
    offset, size = _page_of(path, "state")
    with path.open("r+b") as f:  # half of the page that holds the device state, overwritten
        f.seek(offset + (0 if half == "first" else size // 2))
        f.write(random.Random(9).randbytes(size // 2))

    client = _client(path)
    try:
        assert client.opted_out is True, "the damaged outbox forgot the opt-out"
        # 100 more queries after the wearer opted out: nothing is stored.
        assert sum(client.add([Signal(MUSIC, 4, DAY)]) for _ in range(100)) == 0
        # The rest of the state fails closed too: a minor, today's privacy budget spent.
        assert client.outbox.get_state("minor") == "1"
        assert DailyBudget(20, client.outbox).remaining(DAY) == 0
        assert client.outbox.get_state(STATE_LOST_KEY) is not None
        assert_outbox_balanced(client.outbox)
        # Only the wearer's explicit choice lifts it.
        client.set_opt_out(False)
        assert client.add([Signal(MUSIC, 4, DAY)]) == 1
    finally:
        client.close()


def test_a_state_changed_behind_the_digest_fails_closed(tmp_path: Path) -> None:
    # Damage the integrity check cannot see: a row of the state table rewritten (or lost).
    path = tmp_path / "outbox.db"
    client = _client(path)
    client.set_opt_out(True)
    client.close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("DELETE FROM state WHERE key = 'opted_out'")
        conn.commit()
    client = _client(path)
    try:
        assert client.opted_out is True
    finally:
        client.close()


def test_an_intact_state_survives_recovery_of_other_damage(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    client = _client(path)
    client.add([Signal(MUSIC, 4, DAY)] * 5)
    client.close()
    offset, size = _page_of(path, "signals")
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\x5a" * size)
    client = _client(path)
    try:
        assert client.outbox.recovery is not None and client.outbox.recovery.state_verified
        assert client.opted_out is False and client.outbox.get_state(STATE_LOST_KEY) is None
    finally:
        client.close()


# --- 10: salvage keeps the ledger and the counters; a lost side file loses nothing stored ------------


def test_a_negative_schema_version_in_the_header_is_recovered_with_the_opt_out(tmp_path: Path) -> None:
    """A flipped top bit in the header's user_version makes the version negative: the file is damaged
    (moved aside and salvaged, the wearer's opt-out kept), never taken for an old outbox to migrate."""
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.add("US", [Signal(MUSIC, 2, DAY)])
        box.set_state("opted_out", "1")
    with path.open("r+b") as f:
        f.seek(60)  # the header's user_version, big-endian: its top bit makes it negative
        f.write(b"\x80")
    with Outbox(path) as box:
        assert box.recovery is not None
        assert box.get_state("opted_out") == "1"
        assert_outbox_balanced(box)
    assert list(tmp_path.glob("outbox.db.damaged-*"))


def test_salvage_keeps_the_ledger_and_the_counters(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        for n in range(40):
            box.add("US", [Signal(MUSIC if n % 2 else DOGS, 1 + n % 4, DAY)])
        box.seal(PROFILE, 5)
        for batch in box.batches()[:6]:
            box.acknowledge(batch.batch_id)  # 30 signals in the ledger, 10 still queued
        box.add("US", [Signal(MUSIC, 2, DAY)] * 3)
        ledger_before = box.ledger()
        acknowledged = box.stats().get("signals_acknowledged")
    offset, size = _page_of(path, "batches")
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\x5a" * size)  # the queued batches' page is gone
    with Outbox(path) as box:
        assert box.recovery is not None and box.recovery.counters_recovered
        assert box.ledger() == ledger_before  # every signal already sent is still listed
        stats = box.stats()
        assert stats.get("signals_acknowledged") == acknowledged == 30
        assert stats.get("signals_added") == 43
        assert stats.get("signals_lost_damage") == 10  # the unreadable batches, counted
        assert_outbox_balanced(box)


_WRITER = textwrap.dedent(
    """
    import sys
    from sotto.edge.outbox import Outbox
    from sotto.wire import Signal
    box = Outbox(sys.argv[1])
    for _ in sys.stdin:  # one add per line the test sends, so it knows how many can have been stored
        box.add("US", [Signal("338", 4, int(sys.argv[2]))])
        print("stored", flush=True)
    """
)


def test_a_side_file_deleted_after_a_crash_loses_no_stored_signal(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    rng = random.Random(10)
    stored = 0
    for _cycle in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(DAY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        for _ in range(rng.randint(3, 15)):
            proc.stdin.write("add\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "stored\n"
            stored += 1
        proc.stdin.write("add\n")  # one more add under way (or not yet begun) when the kill comes
        proc.stdin.flush()
        proc.kill()  # kill -9: mid-transaction, with whatever side files exist right now
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    with Outbox(path) as box:
        stats = box.stats()
        # Every add that returned is there (one more per cycle may have committed before the kill).
        assert stored <= stats.queued_signals <= stored + 10
        assert_outbox_balanced(box)


# --- 11: a damaged row is quarantined, not a stall ------------------------------------------------------


def test_a_queued_row_with_a_flipped_region_byte_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.add("US", [Signal(MUSIC, 4, DAY)] * 3)
    offset, size = _page_of(path, "signals")
    data = bytearray(path.read_bytes())
    at = data.index(b"US338", offset, offset + size)  # the record: region then category id
    data[at + 1] = ord("s")  # US -> Us
    path.write_bytes(bytes(data))

    client = _client(path)
    try:
        assert client.outbox.recovery is None  # the file itself is sound: only a value is wrong
        assert client.add([Signal(DOGS, 2, DAY)] * 3) == 3  # used to raise, for every add after
        client.outbox.seal(PROFILE, 5, partial=True)
        stats = client.outbox.stats()
        assert stats.get("signals_quarantined") == 1
        assert sum(b.signals for b in client.outbox.batches()) == 5
        assert all(b.message().region == "US" for b in client.outbox.batches())
        assert_outbox_balanced(client.outbox)
    finally:
        client.close()


# --- 12: the ledger command never moves or creates a file ---------------------------------------------


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("content", [b"not a database at all\n" * 10, b""])
def test_the_ledger_command_leaves_a_file_it_cannot_read_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "mine.db"
    path.write_bytes(content)
    before = _listing(tmp_path)
    assert edge_main(["ledger", "--outbox", str(path)]) == 2
    assert str(path) in capsys.readouterr().err
    assert _listing(tmp_path) == before and path.read_bytes() == content


def test_the_ledger_command_leaves_a_damaged_outbox_in_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.add("US", [Signal(MUSIC, 4, DAY)] * 50)
    offset, size = _page_of(path, "signals")
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\x5a" * size)
    before = _listing(tmp_path)
    for extra in ([], ["--clear"], ["--json"]):
        assert edge_main(["ledger", "--outbox", str(path), *extra]) == 2
        assert "damaged" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_the_ledger_command_reads_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.add("US", [Signal(MUSIC, 4, DAY)])
        box.seal(PROFILE, 1)
        box.acknowledge(box.batches()[0].batch_id)
    os.chmod(path, 0o444)
    try:
        before = _listing(tmp_path)
        assert edge_main(["ledger", "--outbox", str(path), "--json"]) == 0
        assert [e["category_id"] for e in json.loads(capsys.readouterr().out)] == [MUSIC]
        assert _listing(tmp_path) == before
    finally:
        os.chmod(path, 0o644)
    with pytest.raises(OutboxError, match="no such outbox file"):
        Outbox(tmp_path / "absent.db", read_only=True)
    assert not (tmp_path / "absent.db").exists()
