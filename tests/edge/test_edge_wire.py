"""Coarsening, checked field by field: every field of every message a device can send is in the reviewed
allow-list (proto/WIRE_ALLOWLIST.tsv), and every value the real device client puts on the wire passes the
check that list names: category ids from the allowed taxonomy list, day numbers and nothing finer, no free
text, no hardware identifier."""

from __future__ import annotations

import datetime as dt
import random
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from edge_testkit import PROFILE, TODAY, load_allowlist
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from sotto.edge.client import DeletionStatus, DeliveryClient
from sotto.edge.ldp import LdpOptions, LocalPrivacy
from sotto.edge.pipeline import EdgeModels, Pipeline
from sotto.policy import Policy
from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import MAX_DAY_OFFSET, PROFILE_ID_PATTERN, TAXONOMY_VERSION, day_number

#: The RPCs a device calls (Ingest its batches, read or erase its own profile); AudienceSize is admin-only.
DEVICE_METHODS = ("Ingest", "GetProfile", "DeleteProfile")
QUERIES = [
    "book me a flight to paris for next week",
    "where can i buy trail running shoes",
    "i need a doctor for my back pain",
    "i cannot pay my rent this month where can i get help",
    "recommend a good sci-fi movie for tonight",
    "which dog food is best for a puppy",
]
EPSILON = 1.5


def device_fields() -> dict[str, FieldDescriptor]:
    """Every field reachable from the request messages of the device's RPCs, recursively."""
    service = signals_pb2.DESCRIPTOR.services_by_name["SignalAggregator"]
    found: dict[str, FieldDescriptor] = {}

    def visit(message: Descriptor) -> None:
        for field in message.fields:
            if field.full_name in found:
                continue
            found[field.full_name] = field
            if field.message_type is not None:
                visit(field.message_type)

    for name in DEVICE_METHODS:
        visit(service.methods_by_name[name].input_type)
    return found


def test_every_field_a_device_can_send_is_allow_listed() -> None:
    allowed = load_allowlist()
    fields = device_fields()
    assert "sotto.v1.Signal.category_id" in fields  # the walk follows nested messages
    unreviewed = sorted(name for name in fields if name not in allowed)
    assert not unreviewed, f"device-sent field(s) missing from proto/WIRE_ALLOWLIST.tsv: {unreviewed}"
    for name, field in fields.items():
        row = allowed[name]
        assert row.sender == "device", f"{name} is sent by devices but reviewed as {row.sender}-only"
        assert (row.number, row.proto_type, row.repeated) == (
            field.number,
            field.type,
            field.is_repeated,
        ), f"{name}: number, type or label differ from the reviewed row"
        assert row.check in CHECKS, f"{name}: unknown check {row.check!r}"
    stale = sorted(n for n, r in allowed.items() if r.sender == "device" and n not in fields)
    assert not stale, f"allow-listed as device-sent but not in the contract: {stale}"


def test_no_device_field_is_a_timestamp_or_free_form_type() -> None:
    for name, field in device_fields().items():
        if field.message_type is not None:
            assert field.message_type.full_name.startswith("sotto.v1."), f"{name}: foreign message type"
        assert field.type not in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE), (
            f"{name}: a float could carry an audio feature or a score"
        )
        suspicious = r"time|stamp|clock|_ms$|_us$|seconds|text|audio|serial|mac|imei"
        assert not re.search(suspicious, field.name), name


# --- the real device client against a recording aggregator -------------------------------------------


class Recorder(signals_pb2_grpc.SignalAggregatorServicer):
    """Keeps every request a device sends, and answers like an aggregator."""

    def __init__(self) -> None:
        self.requests: list[Message] = []

    def Ingest(self, request: signals_pb2.SignalBatch, context: object) -> signals_pb2.IngestResponse:
        self.requests.append(request)
        return signals_pb2.IngestResponse(batch_id=request.batch_id, applied_signals=len(request.signals))

    def GetProfile(self, request: signals_pb2.GetProfileRequest, context: object) -> signals_pb2.Profile:
        self.requests.append(request)
        return signals_pb2.Profile(profile_id=request.profile_id)

    def DeleteProfile(
        self, request: signals_pb2.DeleteProfileRequest, context: object
    ) -> signals_pb2.DeleteProfileResponse:
        self.requests.append(request)
        return signals_pb2.DeleteProfileResponse(deleted=True)


@pytest.fixture
def recorded(edge_models: EdgeModels, tmp_path: Path) -> Iterator[list[Message]]:
    """What one device sent for QUERIES over three days, with LDP on, then its deletion request."""
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    signals_pb2_grpc.add_SignalAggregatorServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        ids, budget = edge_models.policy.interest_ids, tmp_path / "budget.json"
        local = LocalPrivacy(ids, LdpOptions(EPSILON, 20), budget, random.Random(4))
        device = Pipeline(edge_models, region="US", ldp=local)
        client = DeliveryClient(PROFILE, "US", target=f"127.0.0.1:{port}", batch_size=3)
        try:
            # Each query on three days in a row: whichever queries the classifier keeps, a batch then
            # holds signals of different days, so day offsets other than 0 go on the wire too.
            for text in QUERIES:
                for days_ago in (2, 1, 0):
                    client.add(device.analyze_text(text, today=TODAY - dt.timedelta(days=days_ago)).outgoing)
            assert client.flush()
            stub = signals_pb2_grpc.SignalAggregatorStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            stub.GetProfile(signals_pb2.GetProfileRequest(profile_id=PROFILE, top_k=5), timeout=5)
            assert client.delete_profile() is DeletionStatus.ERASED
        finally:
            client.close()
        yield recorder.requests
    finally:
        server.stop(None)


def _checks(policy: Policy) -> dict[str, Callable[[object], bool]]:
    today = day_number(TODAY)
    return {
        "interest_category": lambda v: v in policy.interest_ids and v not in policy.sensitive,
        "weight_level": lambda v: v == 4,  # noised signals always carry the full level
        "day_offset": lambda v: isinstance(v, int) and 0 <= v <= MAX_DAY_OFFSET,
        "random_id": lambda v: isinstance(v, bytes) and len(v) == 16,
        "profile_id": lambda v: v == PROFILE and PROFILE_ID_PATTERN.fullmatch(str(v)) is not None,
        "region": lambda v: v == "US",
        "taxonomy_version": lambda v: v == TAXONOMY_VERSION,
        "day_number": lambda v: v in (today - 2, today - 1, today),
        "epsilon_milli": lambda v: v == round(EPSILON * 1000),
        "small_count": lambda v: isinstance(v, int) and v <= 1000,
        "message": lambda v: True,  # its fields are checked one by one
    }


#: The check names proto/WIRE_ALLOWLIST.tsv may use for device-sent fields (``_checks`` implements them).
CHECKS = {
    "interest_category",
    "weight_level",
    "day_offset",
    "random_id",
    "profile_id",
    "region",
    "taxonomy_version",
    "day_number",
    "epsilon_milli",
    "small_count",
    "message",
}


def _values(message: Message) -> Iterator[tuple[str, object]]:
    """(full field name, value) of every set field, recursively (repeated fields value by value)."""
    for field, value in message.ListFields():
        items = value if field.is_repeated else [value]
        for item in items:
            yield field.full_name, item
            if isinstance(item, Message):
                yield from _values(item)


def test_every_value_on_the_wire_passes_its_reviewed_check(recorded: list[Message], policy: Policy) -> None:
    allowed = load_allowlist()
    checks = _checks(policy)
    assert set(checks) == CHECKS
    kinds = {type(m).__name__ for m in recorded}
    assert kinds == {"SignalBatch", "GetProfileRequest", "DeleteProfileRequest"}
    seen: set[str] = set()
    for message in recorded:
        for name, value in _values(message):
            seen.add(name)
            check = allowed[name].check
            assert checks[check](value), f"{name} = {value!r} fails its check {check!r}"
    # The run exercised every device field but none optional beyond them.
    assert seen == {n for n, r in allowed.items() if r.sender == "device"}


def test_batch_ids_are_random_not_derived(recorded: list[Message]) -> None:
    ids = [m.batch_id for m in recorded if isinstance(m, signals_pb2.SignalBatch)]
    assert len(ids) >= 3 and len(set(ids)) == len(ids)
    # Nothing in common between ids of one device (a derived id would share a prefix or a counter).
    assert len({i[:4] for i in ids}) == len(ids)


def test_no_clock_value_finer_than_a_day(recorded: list[Message]) -> None:
    # Unix time in seconds is ~1.8e9 today; a day number is ~2e4. Every integer on the wire must be too
    # small to be a clock reading finer than a day (a day number, an offset, a level, a count, epsilon).
    integers = 0
    for message in recorded:
        for name, value in _values(message):
            if isinstance(value, int) and not isinstance(value, bool):
                integers += 1
                assert value < 100_000, f"{name} = {value} is too large for a day number, offset or level"
    assert integers > 10


def _hardware_ids() -> list[bytes]:
    node = uuid.getnode()
    mac = node.to_bytes(6, "big")
    ids = [mac, mac.hex().encode(), ":".join(f"{b:02x}" for b in mac).encode(), socket.gethostname().encode()]
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id", "/sys/class/dmi/id/product_uuid"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value:
            ids += [value.encode(), value.replace("-", "").encode()]
    return [i for i in ids if len(i) >= 4]


def test_no_hardware_identifier_and_no_transcript_on_the_wire(recorded: list[Message]) -> None:
    wire = b"".join(m.SerializeToString() for m in recorded)
    for hardware in _hardware_ids():
        assert hardware not in wire, f"a hardware identifier ({hardware!r}) is on the wire"
    words = {w for q in QUERIES for w in re.findall(r"[a-z]{4,}", q)}
    leaked = sorted(w for w in words if w.encode() in wire.lower())
    assert leaked == [], f"query words on the wire: {leaked}"
