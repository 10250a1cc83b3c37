"""Signal encoding: filtered interests become protobuf batches, and nothing else does.

The message types only have room for a category id, a coarse weight level and a day offset; the
transcript and the audio have no field to go into.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from sotto.v1 import signals_pb2
from sotto.wire import (
    MAX_DAY_OFFSET,
    PROFILE_ID_PATTERN,
    TAXONOMY_VERSION,
    WEIGHT_LEVELS,
    Signal,
    assigned_regions,
    epsilon_milli,
)


def new_batch_id() -> bytes:
    """16 random bytes; a resent batch keeps the id it was given here."""
    return os.urandom(16)


def encode_batch(
    profile_id: str, region: str, interests: Sequence[Signal], batch_id: bytes | None = None
) -> signals_pb2.SignalBatch:
    """Build one SignalBatch; raises ValueError on a malformed profile id, region, weight or day.

    Category and region *policy* is not checked here: the privacy filter enforces it before a signal
    exists, and the aggregator enforces it again before anything is stored.
    """
    if not PROFILE_ID_PATTERN.fullmatch(profile_id):
        raise ValueError(f"profile id {profile_id!r} must be 8 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")
    if region not in assigned_regions():
        raise ValueError(
            f"region {region!r} must be an officially assigned ISO 3166-1 alpha-2 code such as 'US'"
        )
    if not interests:
        raise ValueError("a batch needs at least one signal")
    # The batch declares the mechanism its signals went through, so the aggregator can de-bias counts;
    # one batch holds one mechanism only.
    epsilons = {i.epsilon for i in interests}
    if len(epsilons) > 1:
        raise ValueError(
            f"a batch cannot mix signals noised with different epsilons: {sorted(map(str, epsilons))}"
        )
    (epsilon,) = epsilons
    base_day = max(i.day for i in interests)
    batch = signals_pb2.SignalBatch(
        batch_id=batch_id or new_batch_id(),
        profile_id=profile_id,
        region=region,
        taxonomy_version=TAXONOMY_VERSION,
        base_day=base_day,
        ldp_epsilon_milli=0 if epsilon is None else epsilon_milli(epsilon),
    )
    for interest in interests:
        offset = base_day - interest.day
        if offset > MAX_DAY_OFFSET:
            raise ValueError(
                f"signal from day {interest.day} is more than {MAX_DAY_OFFSET} days older than the batch"
            )
        if interest.weight_level not in WEIGHT_LEVELS:
            raise ValueError(f"weight level {interest.weight_level} is not one of {WEIGHT_LEVELS}")
        batch.signals.add(
            category_id=interest.category_id, weight_level=interest.weight_level, day_offset=offset
        )
    return batch
