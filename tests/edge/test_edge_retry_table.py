"""The client's retry decision: "can a resend succeed?" for every gRPC status code, and a deletion that
stays pending until the aggregator confirms it (issue findings 2 and 14, the device's half).

The status codes come from a scripted aggregator (a unit-test fake: the real one cannot be made to answer
each code on demand); the deletion whose reply is lost runs against a real ``sotto-server serve`` process
behind a proxy that withholds its reply.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from edge_testkit import MUSIC, PROFILE, assert_outbox_balanced
from fault_proxy import ResponseDroppingProxy

import sotto.edge.client as client_module
from sotto.edge.client import RETRYABLE, STATUS_ACTIONS, DeletionStatus, DeliveryClient, deletion_state
from sotto.v1 import signals_pb2
from sotto.wire import Signal, day_number
from tools.harness import issue_tokens, start_server, stop_server
from tools.paths import REPO

DAY = day_number(__import__("datetime").date.today())


def test_every_status_code_has_a_documented_decision() -> None:
    codes = set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert set(STATUS_ACTIONS) == codes
    doc = client_module.__doc__ or ""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for code in codes:
        action = "retry" if code in RETRYABLE else "set aside"
        assert f"\n{code.name.ljust(20)}{action}" in doc, f"{code.name} missing from the client's table"
        assert f"| `{code.name}` | {action} |" in readme, f"{code.name} missing from README's table"
    # The transient ones the issue names are retried.
    for name in ("CANCELLED", "ABORTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"):
        assert grpc.StatusCode[name] in RETRYABLE


class _Scripted:
    """An aggregator that answers the next calls with the scripted codes, then acknowledges."""

    def __init__(self, codes: list[grpc.StatusCode]) -> None:
        self.codes = list(codes)
        self.calls = 0
        self.applied: set[bytes] = set()
        self._lock = threading.Lock()

    def ingest(self, request: signals_pb2.SignalBatch, context: grpc.ServicerContext) -> object:
        with self._lock:
            self.calls += 1
            code = self.codes.pop(0) if self.codes else None
            duplicate = request.batch_id in self.applied
            if code is None or code == grpc.StatusCode.CANCELLED:
                # CANCELLED after the work is done: the resend must be taken as an acknowledgement.
                self.applied.add(request.batch_id)
        if code is not None:
            context.abort(code, f"scripted {code.name}")
        return signals_pb2.IngestResponse(
            batch_id=request.batch_id, duplicate=duplicate, applied_signals=0 if duplicate else 1
        )


@pytest.fixture
def scripted() -> Iterator[tuple[_Scripted, str]]:
    fake = _Scripted([])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "sotto.v1.SignalAggregator",
        {
            "Ingest": grpc.unary_unary_rpc_method_handler(
                fake.ingest,
                request_deserializer=signals_pb2.SignalBatch.FromString,
                response_serializer=signals_pb2.IngestResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize("code", sorted(STATUS_ACTIONS, key=lambda c: c.name), ids=lambda c: c.name)
def test_a_batch_is_retried_or_set_aside_as_the_table_says(
    scripted: tuple[_Scripted, str], code: grpc.StatusCode
) -> None:
    fake, target = scripted
    fake.codes = [code, code]
    client = DeliveryClient(PROFILE, "US", target=target, batch_size=1, backoff_s=0.001, max_attempts=4)
    try:
        client.add([Signal(MUSIC, 4, DAY)])
        assert client.flush() is True
        stats = client.outbox.stats()
        if code in RETRYABLE:
            # Kept, resent with the same id, acknowledged: never set aside for a transient answer.
            assert stats.get("signals_acknowledged") == 1 and stats.get("signals_set_aside") == 0
            assert fake.calls == 3 and client.stats.retries == 2
            assert len(client.outbox.ledger()) == 1
            if code == grpc.StatusCode.CANCELLED:  # the aggregator had applied it: a duplicate is an ack
                assert client.stats.duplicates == 1
        else:
            assert stats.get("signals_set_aside") == 1 and stats.get(f"set_aside_{code.name}") == 1
            assert fake.calls == 1
        assert_outbox_balanced(client.outbox)
    finally:
        client.close()


# --- a deletion whose reply is lost, against a real aggregator process ------------------------------


def test_a_deletion_whose_reply_was_lost_is_confirmed_by_the_revoked_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agg.db'}"
    token = json.loads(issue_tokens(url, PROFILE))[PROFILE]
    proc, target = start_server(url)
    try:
        with ResponseDroppingProxy(target, drop_rate=0.0) as proxy:
            client = DeliveryClient(
                PROFILE, "US", target=proxy.address, token=token, batch_size=1, backoff_s=0.01, max_attempts=1
            )
            try:
                client.add([Signal(MUSIC, 4, DAY)])
                assert client.flush() is True
                proxy._rate = 1.0  # the aggregator erases the profile; its reply never arrives
                assert client.delete_profile() is DeletionStatus.PENDING
                state = deletion_state(client.outbox)
                assert state is not None and state.status is DeletionStatus.PENDING and state.attempts == 1
                assert client.add([Signal(MUSIC, 4, DAY)]) == 0  # silent while pending
                proxy._rate = 0.0
                # The retry meets the revoked token: that proves the earlier attempt went through. (The
                # channel may still be reconnecting after the cut: a few flushes, bounded.)
                for _ in range(20):
                    if client.flush():
                        break
                    time.sleep(0.2)
                settled = deletion_state(client.outbox)
                assert settled is not None and settled.status is DeletionStatus.ALREADY_ERASED
                assert client.deletion_pending is False
            finally:
                client.close()
    finally:
        stop_server(proc)


def test_a_deletion_refused_without_proof_stays_pending(tmp_path: Path) -> None:
    # A token the aggregator never issued: UNAUTHENTICATED on the first attempt proves nothing. Before,
    # the request was cleared and reported as done.
    url = f"sqlite:///{tmp_path / 'agg.db'}"
    issue_tokens(url, PROFILE)
    proc, target = start_server(url)
    try:
        client = DeliveryClient(PROFILE, "US", target=target, token="sotto_not-a-token", backoff_s=0.01)
        try:
            assert client.delete_profile() is DeletionStatus.PENDING
            assert client.flush() is False  # still pending, retried later with backoff
            state = deletion_state(client.outbox)
            assert state is not None and state.status is DeletionStatus.PENDING
            assert state.last_code == "UNAUTHENTICATED"
            assert client.deletion_pending is True
        finally:
            client.close()
    finally:
        stop_server(proc)
