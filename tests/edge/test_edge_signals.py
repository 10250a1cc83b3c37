"""sotto.edge.signals and the sotto.v1 wire contract: what a batch carries, its size, and nothing else."""

from __future__ import annotations

import datetime as dt

import pytest
from edge_testkit import DOGS, MOVIES, MUSIC, PROFILE, TODAY, load_allowlist
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from sotto.edge.signals import MAX_DAY_OFFSET, encode_batch
from sotto.v1 import signals_pb2
from sotto.wire import TAXONOMY_VERSION, Signal, day_number

DAY = day_number(TODAY)
F = FieldDescriptor

# Every field of every message in sotto.v1, as reviewed in proto/WIRE_ALLOWLIST.tsv: (type, number,
# repeated). Adding, renumbering or retyping a field fails this test until the change has been reviewed
# there: nothing may carry a transcript, audio, free text, a fine-grained clock or a hardware identifier.
REVIEWED_FIELDS: dict[str, tuple[int, int, bool]] = {
    row.field: (row.proto_type, row.number, row.repeated) for row in load_allowlist().values()
}
#: The only field names that may hold text or bytes.
REVIEWED_TEXT_FIELDS = {
    "category_id",
    "profile_id",
    "region",
    "taxonomy_version",
    "batch_id",
    "name",
    "tier1",
}


def _all_fields() -> dict[str, FieldDescriptor]:
    """Every field of every message of the sotto.v1 file, following nested and referenced messages."""
    found: dict[str, FieldDescriptor] = {}
    seen: set[str] = set()

    def visit(message: Descriptor) -> None:
        if message.full_name in seen:
            return
        seen.add(message.full_name)
        for field in message.fields:
            found[field.full_name] = field
            if field.message_type is not None:
                visit(field.message_type)
        for nested in message.nested_types:
            visit(nested)

    for message in signals_pb2.DESCRIPTOR.message_types_by_name.values():
        visit(message)
    for service in signals_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            visit(method.input_type)
            visit(method.output_type)
    return found


def _interests(*days: int, category: str = MUSIC) -> list[Signal]:
    return [Signal(category, 3, day) for day in days]


# --- encode_batch ---------------------------------------------------------------------------------


def test_encode_batch_sets_every_field() -> None:
    interests = [Signal(MUSIC, 4, DAY - 2), Signal(MOVIES, 1, DAY), Signal(DOGS, 2, DAY - 30)]
    batch = encode_batch(PROFILE, "US", interests, batch_id=b"\x01" * 16)

    assert batch.batch_id == b"\x01" * 16
    assert batch.profile_id == PROFILE
    assert batch.region == "US"
    assert batch.taxonomy_version == TAXONOMY_VERSION == "3.1"
    assert batch.base_day == DAY  # the newest day in the batch
    assert [(s.category_id, s.weight_level, s.day_offset) for s in batch.signals] == [
        (MUSIC, 4, 2),
        (MOVIES, 1, 0),
        (DOGS, 2, 30),
    ]
    # Round trip through the wire format.
    assert signals_pb2.SignalBatch.FromString(batch.SerializeToString()) == batch


def test_encode_batch_picks_a_fresh_16_byte_id() -> None:
    first = encode_batch(PROFILE, "US", _interests(DAY))
    second = encode_batch(PROFILE, "US", _interests(DAY))
    assert len(first.batch_id) == len(second.batch_id) == 16
    assert first.batch_id != second.batch_id


@pytest.mark.parametrize(
    "profile_id",
    ["short", "", "x" * 65, "has space_0001", "profile/0001", "profil\u00e9_0001"],
)
def test_encode_batch_rejects_bad_profile_id(profile_id: str) -> None:
    with pytest.raises(ValueError, match="profile id"):
        encode_batch(profile_id, "US", _interests(DAY))


@pytest.mark.parametrize("region", ["us", "USA", "U", "", "1A", "U S"])
def test_encode_batch_rejects_bad_region(region: str) -> None:
    with pytest.raises(ValueError, match="ISO 3166-1 alpha-2"):
        encode_batch(PROFILE, region, _interests(DAY))


def test_encode_batch_rejects_empty() -> None:
    with pytest.raises(ValueError, match="at least one signal"):
        encode_batch(PROFILE, "US", [])


def test_encode_batch_rejects_offset_beyond_limit() -> None:
    assert encode_batch(PROFILE, "US", _interests(DAY, DAY - MAX_DAY_OFFSET)).signals[1].day_offset == 30
    with pytest.raises(ValueError, match="more than 30 days older"):
        encode_batch(PROFILE, "US", _interests(DAY, DAY - MAX_DAY_OFFSET - 1))


@pytest.mark.parametrize("level", [0, 5])
def test_encode_batch_rejects_weight_level_out_of_range(level: int) -> None:
    with pytest.raises(ValueError, match="weight level"):
        encode_batch(PROFILE, "US", [Signal(MUSIC, level, DAY)])


def test_twenty_signals_fit_in_twelve_bytes_each() -> None:
    three_digit = ["338", "324", "425", "424", "275", "664", "655", "551", "640", "216"]
    interests = [Signal(three_digit[n % 10], n % 4 + 1, DAY) for n in range(20)]
    batch = encode_batch(PROFILE, "US", interests)
    assert len(batch.signals) == 20
    size = len(batch.SerializeToString())
    assert size == batch.ByteSize()
    assert size / 20 <= 12, f"{size} bytes for 20 signals"


def test_signal_holds_only_id_level_and_offset() -> None:
    batch = encode_batch(PROFILE, "US", [Signal(MUSIC, 4, DAY)])
    decoded = signals_pb2.SignalBatch.FromString(batch.SerializeToString())
    assert {f.name for f, _ in decoded.signals[0].ListFields()} == {"category_id", "weight_level"}


# --- the wire contract ----------------------------------------------------------------------------


def test_every_sotto_v1_field_is_reviewed() -> None:
    fields = _all_fields()
    actual = {name: (f.type, f.number, f.is_repeated) for name, f in fields.items()}
    unreviewed = sorted(set(actual) - set(REVIEWED_FIELDS))
    assert not unreviewed, f"new field(s) need a privacy review and an entry in REVIEWED_FIELDS: {unreviewed}"
    removed = sorted(set(REVIEWED_FIELDS) - set(actual))
    assert not removed, f"field(s) removed from the contract (fields are only added): {removed}"
    assert actual == REVIEWED_FIELDS


def test_only_reviewed_fields_are_text_or_bytes() -> None:
    text = {name: f.name for name, f in _all_fields().items() if f.type in (F.TYPE_STRING, F.TYPE_BYTES)}
    assert text, "the walk found no text fields; it is not looking at the contract"
    unexpected = {name for name, short in text.items() if short not in REVIEWED_TEXT_FIELDS}
    assert not unexpected, f"text/bytes fields outside the reviewed set: {sorted(unexpected)}"


def test_contract_walk_sees_every_message() -> None:
    messages = {name.rsplit(".", 1)[0] for name in _all_fields()}
    assert messages == {
        "sotto.v1.Signal",
        "sotto.v1.SignalBatch",
        "sotto.v1.IngestResponse",
        "sotto.v1.GetProfileRequest",
        "sotto.v1.CategoryScore",
        "sotto.v1.Profile",
        "sotto.v1.DeleteProfileRequest",
        "sotto.v1.DeleteProfileResponse",
        "sotto.v1.AudienceSizeRequest",
        "sotto.v1.AudienceSizeResponse",
    }
    assert signals_pb2.DESCRIPTOR.package == "sotto.v1"


def test_base_day_is_a_day_not_a_timestamp() -> None:
    batch = encode_batch(PROFILE, "US", _interests(DAY))
    assert dt.date(1970, 1, 1) + dt.timedelta(days=batch.base_day) == TODAY
