"""sotto.edge.outbox: durability, stable batches, bounds, integrity recovery, purge, the ledger."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from edge_testkit import CATS, DOGS, GARDENING, MOVIES, MUSIC, PROFILE, TODAY, assert_outbox_balanced

from sotto.edge.outbox import SCHEMA_VERSION, Outbox, OutboxError, OutboxLimits
from sotto.wire import Signal, day_number

DAY = day_number(TODAY)
CATEGORIES = [MUSIC, MOVIES, DOGS, CATS, GARDENING]


class FakeClock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _signals(n: int, start: int = 0) -> list[Signal]:
    return [Signal(CATEGORIES[(start + i) % len(CATEGORIES)], 1 + (start + i) % 4, DAY) for i in range(n)]


def test_signals_survive_reopen_and_batches_keep_id_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        assert box.add("US", _signals(5)) == 5
        assert box.seal(PROFILE, batch_size=2) == 2  # two full batches; one signal waits for more
        sealed = box.batches()
    # A new process (same file): the same batches, byte for byte, in the same order, plus the loose one.
    with Outbox(path) as box:
        assert box.batches() == sealed
        assert box.stats().unsealed_signals == 1
        assert box.seal(PROFILE, batch_size=2, partial=True) == 1
        batches = box.batches()
    assert batches[:2] == sealed and len(batches) == 3
    messages = [b.message() for b in batches]
    assert [len(m.signals) for m in messages] == [2, 2, 1]
    assert all(
        m.profile_id == PROFILE and m.region == "US" and m.batch_id == b.batch_id
        for m, b in zip(messages, batches, strict=True)
    )
    sent = [(s.category_id, s.weight_level) for m in messages for s in m.signals]
    assert sent == [(i.category_id, i.weight_level) for i in _signals(5)]


def test_batches_declare_the_epsilon_their_signals_were_noised_with(tmp_path: Path) -> None:
    """Noised signals keep their mechanism through the disk: each batch holds one epsilon and declares
    it (the aggregator de-biases by it), and un-noised signals never share a batch with noised ones."""
    plain = _signals(2)
    noised = [Signal(i.category_id, 4, i.day, epsilon=2.0) for i in _signals(3, start=2)]
    other = [Signal(i.category_id, 4, i.day, epsilon=0.5) for i in _signals(1, start=5)]
    with Outbox(tmp_path / "outbox.db") as box:
        box.add("US", plain + noised + other)
        assert box.seal(PROFILE, batch_size=10, partial=True) == 3
        messages = [b.message() for b in box.batches()]
    assert [(m.ldp_epsilon_milli, len(m.signals)) for m in messages] == [(0, 2), (2000, 3), (500, 1)]
    assert [s.category_id for s in messages[1].signals] == [i.category_id for i in noised]


def test_file_has_a_rollback_journal_with_full_sync_and_versioned_schema(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        # Not WAL: a committed signal lives only in the database file, never only in a side file.
        assert box._conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert box._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    Outbox(path).close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    with pytest.raises(OutboxError, match="newer than this software"):
        Outbox(path)
    assert path.read_bytes() == before


def test_batches_split_by_region_and_day_span() -> None:
    with Outbox(None) as box:
        box.add("US", [Signal(MUSIC, 4, DAY - 40), Signal(DOGS, 4, DAY)])
        box.add("CA", [Signal(CATS, 2, DAY)])
        assert box.seal(PROFILE, batch_size=10, partial=True) == 3
        messages = [b.message() for b in box.batches()]
    assert [(m.region, m.base_day, len(m.signals)) for m in messages] == [
        ("US", DAY - 40, 1),
        ("US", DAY, 1),
        ("CA", DAY, 1),
    ]


def test_acknowledge_moves_signals_to_the_ledger_once() -> None:
    clock = FakeClock()
    with Outbox(None, clock=clock) as box:
        box.add("US", _signals(3))
        box.seal(PROFILE, batch_size=3)
        (batch,) = box.batches()
        assert box.acknowledge(batch.batch_id) is True
        assert box.acknowledge(batch.batch_id) is False  # already gone: nothing counted twice
        ledger = box.ledger()
        stats = box.stats()
        assert_outbox_balanced(box)
    assert [(e.category_id, e.weight_level, e.day, e.batch_id) for e in ledger] == [
        (i.category_id, i.weight_level, i.day, batch.batch_id) for i in _signals(3)
    ]
    assert all(e.sent_at == clock.now for e in ledger)
    assert stats.get("batches_acknowledged") == 1 and stats.get("signals_acknowledged") == 3
    assert stats.queued_batches == 0 and stats.ledger_entries == 3


def test_set_aside_is_counted_never_resent_and_bounded() -> None:
    with Outbox(None, OutboxLimits(max_set_aside=2)) as box:
        box.add("US", _signals(4))
        box.seal(PROFILE, batch_size=1)
        for batch in box.batches()[:3]:
            assert box.set_aside(batch.batch_id, "INVALID_ARGUMENT")
        stats = box.stats()
        remaining = box.batches()
        assert_outbox_balanced(box)
    assert len(remaining) == 1
    assert stats.get("batches_set_aside") == 3 and stats.get("set_aside_INVALID_ARGUMENT") == 3
    assert stats.set_aside_batches == 2  # only the newest kept for inspection


def test_overflow_drops_the_oldest_batches_counts_them_and_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, OutboxLimits(max_batches=5)) as box:
        for i in range(8):
            box.add("US", _signals(2, start=2 * i))
            box.seal(PROFILE, batch_size=2)
        kept = [b.message() for b in box.batches()]
        stats = box.stats()
        assert_outbox_balanced(box)
    assert stats.get("batches_dropped_overflow") == 3 and stats.get("signals_dropped_overflow") == 6
    expected = [[(i.category_id, i.weight_level) for i in _signals(2, start=2 * k)] for k in range(3, 8)]
    assert [[(s.category_id, s.weight_level) for s in m.signals] for m in kept] == expected


def test_signal_bound_counts_loose_signals_too() -> None:
    with Outbox(None, OutboxLimits(max_batches=100, max_signals=5)) as box:
        box.add("US", _signals(4))
        box.seal(PROFILE, batch_size=2)
        box.add("US", _signals(3, start=4))
        stats = box.stats()
        assert_outbox_balanced(box)
    assert stats.queued_signals == 5
    assert stats.get("batches_dropped_overflow") == 1 and stats.get("signals_dropped_overflow") == 2


def test_age_bound_drops_old_batches_and_signals() -> None:
    clock = FakeClock()
    with Outbox(None, OutboxLimits(max_age_days=30), clock=clock) as box:
        box.add("US", _signals(2))
        box.seal(PROFILE, batch_size=2)
        box.add("US", _signals(1))  # loose
        clock.now += 29 * 86400
        box.add("US", _signals(1, start=3))
        clock.now += 2 * 86400  # the first three are now 31 days old, the last 2 days
        box.enforce_limits()
        stats = box.stats()
        assert_outbox_balanced(box)
    assert stats.get("batches_dropped_age") == 1 and stats.get("signals_dropped_age") == 3
    assert stats.queued_signals == 1


def test_purge_erases_queue_but_keeps_ledger_and_clear_ledger_erases_it(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.add("US", _signals(2))
        box.seal(PROFILE, batch_size=2)
        box.acknowledge(box.batches()[0].batch_id)
        box.add("US", _signals(3))
        box.seal(PROFILE, batch_size=2)
        assert box.purge() == 3
        assert box.stats().queued_signals == 0 and box.batches() == []
        assert len(box.ledger()) == 2
        assert_outbox_balanced(box)
        assert box.clear_ledger() == 2
        assert box.ledger() == []


@pytest.mark.parametrize(
    "limits",
    [
        {"max_batches": 0},
        {"max_signals": 0},
        {"max_set_aside": 0},
        {"max_age_days": 0},
        {"ledger_max_age_days": -1},
    ],
)
def test_bad_limits_are_refused(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutboxLimits(**limits)  # type: ignore[arg-type]


def test_a_directory_is_not_an_outbox(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="not a file"):
        Outbox(tmp_path)


# --- integrity ---------------------------------------------------------------------------------------


def _filled(path: Path, batches: int = 40, loose: int = 3) -> list[bytes]:
    """An outbox with ``batches`` sealed batches of 2, ``loose`` unsealed signals and a ledger of 2."""
    with Outbox(path) as box:
        box.add("US", _signals(2))
        box.seal(PROFILE, batch_size=2)
        box.acknowledge(box.batches()[0].batch_id)
        box.add("US", _signals(2 * batches))
        box.seal(PROFILE, batch_size=2)
        box.add("US", _signals(loose))
        return [b.batch_id for b in box.batches()]


def test_an_intact_file_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    _filled(path, batches=3)
    with Outbox(path) as box:
        assert box.recovery is None
        assert len(box.batches()) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if "damaged" in p.name) == []


def test_truncated_file_is_detected_moved_aside_and_the_rest_recovered(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    ids = _filled(path, batches=400)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        recovered = [b.batch_id for b in box.batches()]
        # Keeps working: new signals join the three recovered loose ones and are sealed.
        assert box.stats().unsealed_signals == 3
        box.add("US", _signals(3))
        assert box.seal(PROFILE, batch_size=2) == 3
        stats = box.stats()
    assert recovery.moved_to.exists() and recovery.moved_to.name.startswith("outbox.db.damaged-")
    assert recovery.recovered_batches == len(recovered)
    assert 0 < len(recovered) < len(ids)  # part survived, part was in the cut-off half
    assert set(recovered) <= set(ids)
    assert recovered == [i for i in ids if i in set(recovered)]  # order kept
    assert stats.get("recoveries") == 1
    with Outbox(path) as again:  # the recovered file is healthy
        assert again.recovery is None


def test_corrupted_pages_are_detected_and_readable_rows_recovered(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    ids = _filled(path, batches=400)
    page = 4096
    with path.open("r+b") as f:
        f.seek(page * 6)
        f.write(b"\xa5" * page * 3)  # three pages of garbage in the middle of the file
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        recovered = box.batches()
    assert recovery.problem
    assert recovered, "nothing was recovered"
    assert {b.batch_id for b in recovered} <= set(ids)
    assert all(b.message().batch_id == b.batch_id for b in recovered)  # only valid batches come back


def test_garbage_file_is_moved_aside_and_a_fresh_outbox_started(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not a database" * 100)
    with Outbox(path) as box:
        assert box.recovery is not None
        assert box.recovery.recovered_batches == box.recovery.recovered_signals == 0
        box.add("US", _signals(1))
        assert box.stats().queued_signals == 1
    assert box.recovery.moved_to.read_bytes().startswith(b"this is not a database")


def test_outbox_file_holds_no_transcript(tmp_path: Path, edge_models: object) -> None:
    """The outbox is the path off the device: after a real utterance, its bytes hold no word of it."""
    from sotto.edge.pipeline import EdgeModels, Pipeline

    assert isinstance(edge_models, EdgeModels)
    query = "where can i buy a new laptop"
    result = Pipeline(edge_models).analyze_text(query, today=TODAY)
    assert result.signals
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.add("US", result.signals)
        box.seal(PROFILE, batch_size=1)
        box.acknowledge(box.batches()[0].batch_id)
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for word in ("trail", "running", "shoes", "where can"):
        assert word.encode() not in data
