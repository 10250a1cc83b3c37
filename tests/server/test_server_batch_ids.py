"""Batch ids belong to their profile: against a real ``sotto-server serve`` process, a device that sends a
batch under another device's id first neither blocks the genuine batch nor learns whether the id exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import (
    ELECTRONICS,
    MUSIC,
    OTHER,
    PROFILE,
    bearer,
    make_batch,
    signal,
)

from sotto.server.config import utc_today
from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import day_number
from tools.harness import start_server, stop_server

pytestmark = pytest.mark.e2e


def _device_token(db_url: str, profile_id: str, cwd: Path) -> str:
    issued = subprocess.run(
        [sys.executable, "-m", "sotto.server", "token", "issue", "--db", db_url, profile_id],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert issued.returncode == 0, issued.stderr
    return str(json.loads(issued.stdout)[profile_id])


def _reply(reply: signals_pb2.IngestResponse) -> tuple[bytes, bool, int]:
    return (reply.batch_id, reply.duplicate, reply.applied_signals)


def test_another_device_cannot_claim_or_probe_a_batch_id(db_url: str, tmp_path: Path) -> None:
    genuine_token = _device_token(db_url, PROFILE, tmp_path)
    attacker_token = _device_token(db_url, OTHER, tmp_path)
    today = day_number(utc_today())
    claimed_id, used_id, fresh_id = b"\x0a" * 16, b"\x0b" * 16, b"\x0c" * 16
    server, target = start_server(db_url, cwd=tmp_path)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = signals_pb2_grpc.SignalAggregatorStub(channel)

            def ingest(
                token: str, profile_id: str, batch_id: bytes, category: str
            ) -> signals_pb2.IngestResponse:
                batch = make_batch(
                    [signal(category, 4)], profile_id=profile_id, base_day=today, batch_id=batch_id
                )
                return stub.Ingest(batch, timeout=10, metadata=bearer(token))

            # The attacker sends first under the id the genuine device is about to use.
            assert _reply(ingest(attacker_token, OTHER, claimed_id, ELECTRONICS)) == (claimed_id, False, 1)
            # The genuine batch is applied, not refused as ALREADY_EXISTS (which its client sets aside).
            assert _reply(ingest(genuine_token, PROFILE, claimed_id, MUSIC)) == (claimed_id, False, 1)
            assert _reply(ingest(genuine_token, PROFILE, used_id, MUSIC)) == (used_id, False, 1)
            # Probing: an id the genuine device used answers exactly as an id nobody used.
            probe_used = ingest(attacker_token, OTHER, used_id, ELECTRONICS)
            probe_fresh = ingest(attacker_token, OTHER, fresh_id, ELECTRONICS)
            assert _reply(probe_used)[1:] == _reply(probe_fresh)[1:] == (False, 1)
            # Resends are still recognised per profile: each applied once.
            assert _reply(ingest(genuine_token, PROFILE, claimed_id, MUSIC)) == (claimed_id, True, 0)
            assert _reply(ingest(attacker_token, OTHER, claimed_id, ELECTRONICS)) == (claimed_id, True, 0)
            # A reuse with other content is still refused within a profile.
            with pytest.raises(grpc.RpcError) as info:
                ingest(genuine_token, PROFILE, used_id, ELECTRONICS)
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]

            genuine = stub.GetProfile(
                signals_pb2.GetProfileRequest(profile_id=PROFILE), timeout=10, metadata=bearer(genuine_token)
            )
            attacker = stub.GetProfile(
                signals_pb2.GetProfileRequest(profile_id=OTHER), timeout=10, metadata=bearer(attacker_token)
            )
    finally:
        err = stop_server(server)
    assert server.returncode == 0, err
    assert genuine.batches == 2
    assert [s.category_id for s in genuine.scores] == [MUSIC]
    assert attacker.batches == 3
    assert [s.category_id for s in attacker.scores] == [ELECTRONICS]
