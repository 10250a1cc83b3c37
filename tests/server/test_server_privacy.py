"""What the aggregator guarantees whatever a device sends: sensitive categories and blocked regions are
refused and never stored, minors' signals are refused and purged (by the region table's rule, which is data),
and audience counts are de-biased for local differential privacy without breaking k-anonymity. Every
check of what is stored reads the database with plain SQL, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import (
    MUSIC,
    OTHER,
    PROFILE,
    REPO,
    TODAY_DAY,
    bearer,
    cells_mentioning,
    dump_tables,
    issue_admin_token,
    issue_device_token,
    make_batch,
    running,
    signal,
)

from sotto.edge.ldp import RandomizedResponse
from sotto.ldp_math import debias
from sotto.policy import Policy, models_dir
from sotto.server import ServerConfig
from sotto.server.store import open_store
from sotto.server.validation import validate_batch
from sotto.v1 import signals_pb2

SIGNAL_TABLES = ("batches", "profiles", "scores", "signal_counts")


def _sensitive_ids(policy: Policy) -> list[str]:
    """One listed id per sensitive class, plus a descendant of a subtree entry."""
    by_class: dict[str, str] = {}
    with (models_dir() / "sensitive_categories.tsv").open(encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            cid, _subtree, cls, *_ = line.rstrip("\n").split("\t")
            by_class.setdefault(cls, cid)
    return sorted(by_class.values()) + ["305"]  # 305 Pregnancy, under 286 Medical Health


def _signal_rows(db_url: str) -> dict[str, list[tuple[object, ...]]]:
    tables = dump_tables(db_url)
    return {t: tables[t] for t in SIGNAL_TABLES}


# --- a malicious device -----------------------------------------------------------------------------------


def test_sensitive_or_blocked_region_batches_are_refused_and_leave_no_row(
    auth_config: ServerConfig, db_url: str, policy: Policy
) -> None:
    sensitive = _sensitive_ids(policy)
    assert len(sensitive) >= 10

    async def scenario() -> list[grpc.StatusCode]:
        codes = []
        async with running(db_url, auth_config) as r:
            token = bearer(await issue_device_token(r.store, PROFILE))
            attacks = [make_batch([signal(cid)]) for cid in sensitive]
            # A sensitive id hidden behind a valid one, and one in a batch declaring LDP noise.
            attacks.append(make_batch([signal(MUSIC), signal(sensitive[0])]))
            attacks.append(make_batch([signal(sensitive[1], 4)], ldp_epsilon_milli=2000))
            # Valid categories from regions the table blocks.
            blocked = ("DE", "GB", "CH", "KR", "NO")
            attacks += [make_batch([signal(MUSIC)], region=region) for region in blocked]
            for batch in attacks:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await r.stub.Ingest(batch, timeout=5, metadata=token)
                codes.append(info.value.code())
        return codes

    codes = asyncio.run(scenario())
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert _signal_rows(db_url) == {t: [] for t in SIGNAL_TABLES}
    for cid in sensitive:
        assert not [row for table, row in cells_mentioning(db_url, cid) if table in SIGNAL_TABLES]


def test_epsilon_outside_what_the_aggregator_accepts_is_refused(config: ServerConfig) -> None:
    with pytest.raises(ValueError, match="ldp_epsilon_milli must be at most 10000"):
        validate_batch(make_batch(ldp_epsilon_milli=10001), config)
    strict = dataclasses.replace(config, max_ldp_epsilon=2.0)
    with pytest.raises(ValueError, match="only accepts signals noised"):
        validate_batch(make_batch(), strict)
    with pytest.raises(ValueError, match="at most 2000"):
        validate_batch(make_batch(ldp_epsilon_milli=2500), strict)
    assert validate_batch(make_batch(ldp_epsilon_milli=1500), strict).epsilon_milli == 1500


def test_declared_epsilon_is_part_of_the_batch_content(config: ServerConfig) -> None:
    batch = make_batch(batch_id=b"\x07" * 16)
    noised = signals_pb2.SignalBatch()
    noised.CopyFrom(batch)
    noised.ldp_epsilon_milli = 1000
    assert validate_batch(batch, config).digest != validate_batch(noised, config).digest


# --- minors -------------------------------------------------------------------------------------------


def test_marking_a_minor_purges_its_rows_and_refuses_its_batches(
    auth_config: ServerConfig, db_url: str
) -> None:
    async def scenario() -> None:
        async with running(db_url, auth_config) as r:
            minor = bearer(await issue_device_token(r.store, PROFILE))
            adult = bearer(await issue_device_token(r.store, OTHER))
            await r.stub.Ingest(make_batch(), timeout=5, metadata=minor)
            await r.stub.Ingest(make_batch(profile_id=OTHER), timeout=5, metadata=adult)
            assert [row for t, row in cells_mentioning(db_url, PROFILE) if t in SIGNAL_TABLES]

            erased = await r.store.mark_minor(PROFILE, True)
            assert erased >= 4  # batch id, profile, two scores, signal counts
            assert not [row for t, row in cells_mentioning(db_url, PROFILE) if t in SIGNAL_TABLES]
            assert dump_tables(db_url)["minors"] == [(PROFILE,)]

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.Ingest(make_batch(), timeout=5, metadata=minor)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "marked as a minor" in (info.value.details() or "")
            assert not [row for t, row in cells_mentioning(db_url, PROFILE) if t in SIGNAL_TABLES]
            # Other profiles are untouched and keep working.
            assert await r.store.get_profile(OTHER) is not None
            await r.stub.Ingest(make_batch(profile_id=OTHER), timeout=5, metadata=adult)

            # Deletion erases the profile's rows but keeps the mark: it only ever stops data.
            await r.store.delete_profile(PROFILE)
            assert await r.store.minors() == [PROFILE]
            await r.store.mark_minor(PROFILE, False)
            assert await r.store.minors() == []
            minor = bearer(await issue_device_token(r.store, PROFILE))
            await r.stub.Ingest(make_batch(), timeout=5, metadata=minor)

    asyncio.run(scenario())


def test_minors_rule_comes_from_the_table_not_the_code(
    auth_config: ServerConfig, db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("iab_content_taxonomy_3.1.tsv", "sensitive_categories.tsv", "interest_categories.tsv"):
        shutil.copyfile(models_dir() / name, folder / name)
    shipped = (models_dir() / "region_policy.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    without = [line for line in shipped if "\tno_minors\t" not in line]
    assert len(without) == len(shipped) - 1
    (folder / "region_policy.tsv").write_text("".join(without), encoding="utf-8")
    lenient = dataclasses.replace(auth_config, policy=Policy.load(folder))
    (folder / "region_policy.tsv").write_text(
        "".join(without) + "US\tno_minors\t2025-01-01\t\tUS only\n", encoding="utf-8"
    )
    regional = dataclasses.replace(auth_config, policy=Policy.load(folder))

    async def scenario() -> None:
        async with running(db_url, lenient) as r:
            token = bearer(await issue_device_token(r.store, PROFILE))
            await r.store.mark_minor(PROFILE, True)
            reply = await r.stub.Ingest(make_batch(), timeout=5, metadata=token)  # no rule: accepted
            assert reply.applied_signals == 2
        async with running(db_url, regional) as r:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.Ingest(make_batch(), timeout=5, metadata=token)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            reply = await r.stub.Ingest(make_batch(region="BR"), timeout=5, metadata=token)
            assert reply.applied_signals == 2  # the rule is for the US only

    asyncio.run(scenario())


def test_minor_command_marks_lists_and_unmarks(db_url: str, config: ServerConfig) -> None:
    async def seed() -> None:
        store = await open_store(db_url, 30)
        try:
            await store.apply_batch(validate_batch(make_batch(), config))
        finally:
            await store.close()

    asyncio.run(seed())

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sotto.server", "minor", "--db", db_url, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    marked = run(PROFILE)
    assert marked.returncode == 0, marked.stderr
    assert json.loads(marked.stdout) == {"marked": [PROFILE], "erased_rows": {PROFILE: 6}}
    assert json.loads(run("--list").stdout) == {"minors": [PROFILE]}
    assert _signal_rows(db_url) == {t: [] for t in SIGNAL_TABLES}
    assert json.loads(run(PROFILE, "--unmark").stdout)["unmarked"] == [PROFILE]
    assert json.loads(run("--list").stdout) == {"minors": []}
    bad = run("bad id!")
    assert bad.returncode == 2 and "profile_id must be" in bad.stderr
    assert run().returncode == 2


# --- de-biased audiences ------------------------------------------------------------------------------


def test_audience_estimate_recovers_the_true_count_of_a_noised_population(
    auth_config: ServerConfig, db_url: str, policy: Policy
) -> None:
    """300 devices, 4 signals each, noised with epsilon 2: the naive count is far off, the de-biased one
    is within its interval."""
    config = dataclasses.replace(auth_config, min_audience=10)
    rng = random.Random(21)
    categories = sorted(policy.interest_ids)
    rr = RandomizedResponse(categories, 2.0, rng)
    popular = [MUSIC] * 5 + categories[:20]
    truth: Counter[str] = Counter()
    batches = []
    for n in range(300):
        true = rng.choices(popular, k=4)
        truth.update(true)
        reported = [signal(rr.perturb(c), 4) for c in true]
        batches.append(make_batch(reported, profile_id=f"device_{n:05d}", ldp_epsilon_milli=2000))

    async def scenario() -> signals_pb2.AudienceSizeResponse:
        async with running(db_url, config) as r:
            for batch in batches:
                await r.store.apply_batch(validate_batch(batch, config))
            admin = bearer(await issue_admin_token(r.store))
            request = signals_pb2.AudienceSizeRequest(category_id=MUSIC)
            return await r.stub.AudienceSize(request, timeout=5, metadata=admin)

    reply = asyncio.run(scenario())
    assert not reply.too_small
    assert reply.noised_signals == 1200 and reply.confidence == 0.95
    assert reply.estimate_low <= truth[MUSIC] <= reply.estimate_high
    assert reply.estimate_low < reply.estimated_signals < reply.estimate_high
    # The stored (noised) count alone would say far less than the truth.
    observed = sum(1 for b in batches for s in b.signals if s.category_id == MUSIC)
    assert observed < truth[MUSIC] * 0.6
    assert reply.estimated_signals == pytest.approx(
        debias([(2000, observed, 1200)], len(categories)).estimate
    )


def test_without_noise_the_estimate_is_the_exact_signal_count(config: ServerConfig, db_url: str) -> None:
    config = dataclasses.replace(config, min_audience=3)

    async def scenario() -> signals_pb2.AudienceSizeResponse:
        async with running(db_url, config) as r:
            for n in range(4):
                batch = make_batch([signal(MUSIC), signal(MUSIC, 2, 1)], profile_id=f"device_{n:05d}")
                await r.stub.Ingest(batch, timeout=5)
            return await r.stub.AudienceSize(signals_pb2.AudienceSizeRequest(category_id=MUSIC), timeout=5)

    reply = asyncio.run(scenario())
    assert (reply.profiles, reply.estimated_signals, reply.estimate_low, reply.estimate_high) == (4, 8, 8, 8)
    assert reply.noised_signals == 0


def test_estimate_below_k_hides_both_figures(config: ServerConfig, db_url: str, policy: Policy) -> None:
    """Noise spreads reports over every category, so many profiles may show a category few truly have:
    when the de-biased estimate is below k, neither it nor the profile count is revealed."""
    config = dataclasses.replace(config, min_audience=20)
    others = sorted(policy.interest_ids - {MUSIC})

    async def scenario() -> signals_pb2.AudienceSizeResponse:
        async with running(db_url, config) as r:
            # 21 profiles report MUSIC once among 2000 noised reports at epsilon 0.5: no more than
            # randomized response alone produces (q * 2000 is about 22), so the estimate is below 0.
            for n in range(200):
                cids = [MUSIC] if n < 21 else []
                cids += [others[(n * 10 + i) % len(others)] for i in range(10 - len(cids))]
                batch = make_batch(
                    [signal(c, 4) for c in cids], profile_id=f"device_{n:05d}", ldp_epsilon_milli=500
                )
                await r.store.apply_batch(validate_batch(batch, config))
            return await r.stub.AudienceSize(signals_pb2.AudienceSizeRequest(category_id=MUSIC), timeout=5)

    reply = asyncio.run(scenario())
    assert reply.too_small
    hidden = (reply.profiles, reply.estimated_signals, reply.estimate_high, reply.noised_signals)
    assert hidden == (0, 0, 0, 0)


def test_signal_counts_follow_deletion_and_retention(config: ServerConfig, db_url: str) -> None:
    async def scenario() -> None:
        store = await open_store(db_url, 30)
        try:
            await store.apply_batch(validate_batch(make_batch(ldp_epsilon_milli=1000), config))
            await store.apply_batch(validate_batch(make_batch(profile_id=OTHER), config))
            assert await store.signal_counts(MUSIC, TODAY_DAY - 5) == [(0, 1, 2), (1000, 1, 2)]
            await store.delete_profile(PROFILE)
            assert await store.signal_counts(MUSIC, TODAY_DAY - 5) == [(0, 1, 2)]
            assert (await store.purge(TODAY_DAY + 1)).signal_counts == 2
            assert await store.signal_counts(MUSIC, 0) == []
        finally:
            await store.close()

    asyncio.run(scenario())
    assert dump_tables(db_url)["signal_counts"] == []
