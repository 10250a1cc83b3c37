"""Protobuf to domain values at the service boundary: every check a batch must pass before it is stored.

Messages name the field and what was expected, and never echo a profile id.
"""

from __future__ import annotations

import hashlib
import json
import math

from sotto.policy import Policy
from sotto.server.config import ServerConfig
from sotto.server.store.base import Batch, Signal
from sotto.v1 import signals_pb2
from sotto.wire import (
    EPSILON_SCALE,
    MAX_DAY_OFFSET,
    MAX_EPSILON,
    PROFILE_ID_PATTERN,
    TAXONOMY_VERSION,
    WEIGHT_LEVELS,
    assigned_regions,
    date_of,
)

BATCH_ID_BYTES = 16
#: base_day may be at most this many days after today (devices ahead of UTC) ...
MAX_FUTURE_DAYS = 1
#: ... and at most this many days before it (a device that was offline for a long time).
MAX_PAST_DAYS = 400


#: Characters of a client's string quoted back in an error message; the rest is summarised by its length,
#: so that an error can never grow with the request (gRPC refuses trailers past 16 KB).
MAX_QUOTED = 40


def quoted(value: str) -> str:
    """``value`` as ``repr`` shows it, cut to ``MAX_QUOTED`` characters with its length when longer."""
    if len(value) <= MAX_QUOTED:
        return repr(value)
    return f"{value[:MAX_QUOTED]!r}... ({len(value)} characters)"


class ValidationError(ValueError):
    """A request field is invalid; ``str(error)`` is the message for the client."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def accepted_days(today: int) -> tuple[int, int]:
    """The oldest observation day and the newest base day a batch may carry on day ``today``."""
    return today - MAX_PAST_DAYS - MAX_DAY_OFFSET, today + MAX_FUTURE_DAYS


def validate_profile_id(profile_id: str) -> str:
    """Return ``profile_id`` if it is 8 to 64 characters of ``[A-Za-z0-9_-]``, else raise."""
    if not PROFILE_ID_PATTERN.fullmatch(profile_id):
        raise ValidationError(
            "profile_id",
            f"profile_id must be 8 to 64 characters of A-Z, a-z, 0-9, '_' or '-' "
            f"(^[A-Za-z0-9_-]{{8,64}}$); got {len(profile_id)} characters that do not match",
        )
    return profile_id


def validate_category(field: str, cid: str, policy: Policy) -> str:
    """Return ``cid`` if it is an interest category this aggregator stores; raise naming ``field`` if not."""
    if cid not in policy.taxonomy:
        raise ValidationError(
            field,
            f"{field}: unknown category {quoted(cid)}; "
            f"expected an IAB Content Taxonomy {TAXONOMY_VERSION} unique id",
        )
    sensitive = policy.sensitive.match(cid)
    if sensitive is not None:
        raise ValidationError(
            field,
            f"{field}: sensitive category {cid} ({policy.taxonomy[cid].name}; class "
            f"{sensitive.cls}) may never be stored",
        )
    if cid not in policy.interest_ids:
        raise ValidationError(
            field,
            f"{field}: category {cid} ({policy.taxonomy[cid].name}) is not an interest category "
            f"this aggregator accepts (the {len(policy.interest_ids)} accepted ids are listed in "
            "models/interest_categories.tsv)",
        )
    return cid


def _validate_signal(n: int, msg: signals_pb2.Signal, base_day: int, config: ServerConfig) -> Signal:
    field = f"signals[{n}]"
    cid = validate_category(f"{field}.category_id", msg.category_id, config.policy)
    if msg.weight_level not in WEIGHT_LEVELS:
        raise ValidationError(
            f"{field}.weight_level",
            f"{field}.weight_level must be one of {', '.join(map(str, WEIGHT_LEVELS))}; "
            f"got {msg.weight_level}",
        )
    if msg.day_offset > MAX_DAY_OFFSET:
        raise ValidationError(
            f"{field}.day_offset",
            f"{field}.day_offset must be at most {MAX_DAY_OFFSET} days before base_day; got {msg.day_offset}",
        )
    return Signal(category_id=cid, weight_level=msg.weight_level, day=base_day - msg.day_offset)


def _digest(msg: signals_pb2.SignalBatch) -> bytes:
    # Our own canonical form: protobuf serialisation is not guaranteed to be byte-stable, and the order
    # of signals does not change what a batch means.
    content = {
        "profile_id": msg.profile_id,
        "region": msg.region,
        "taxonomy_version": msg.taxonomy_version,
        "base_day": msg.base_day,
        "signals": sorted([s.category_id, s.weight_level, s.day_offset] for s in msg.signals),
    }
    if msg.ldp_epsilon_milli:  # only when set: digests of batches from before the field stay the same
        content["ldp_epsilon_milli"] = msg.ldp_epsilon_milli
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).digest()


def validate_batch(msg: signals_pb2.SignalBatch, config: ServerConfig) -> Batch:
    """Check every field of ``msg`` against ``config`` and its policy; raise ``ValidationError`` or
    return the domain ``Batch``."""
    if len(msg.batch_id) != BATCH_ID_BYTES:
        raise ValidationError(
            "batch_id", f"batch_id must be exactly {BATCH_ID_BYTES} bytes; got {len(msg.batch_id)}"
        )
    validate_profile_id(msg.profile_id)
    if msg.region not in assigned_regions():
        # The same rule as the device's (sotto.wire): a region the region table cannot place is never
        # profiled. No alias on the wire: the device maps 'UK' to 'GB' before it stores a signal.
        raise ValidationError(
            "region",
            "region must be an officially assigned ISO 3166-1 alpha-2 code in upper case, for example "
            f"'US' or 'GB'; got {quoted(msg.region)}",
        )
    rule = config.policy.regions.blocked(msg.region, config.clock())
    if rule is not None:
        raise ValidationError("region", f"region {msg.region} does not allow profiling ({rule.note})")
    if msg.taxonomy_version != TAXONOMY_VERSION:
        raise ValidationError(
            "taxonomy_version",
            f"taxonomy_version must be {TAXONOMY_VERSION!r}; got {quoted(msg.taxonomy_version)}",
        )
    count, limit = len(msg.signals), config.max_signals_per_batch
    if count == 0:
        raise ValidationError("signals", f"signals: batch has no signals; expected 1 to {limit}")
    if count > limit:
        raise ValidationError("signals", f"oversize batch: {count} signals, at most {limit}")
    today = config.today()
    newest = today + MAX_FUTURE_DAYS
    if msg.base_day > newest:
        raise ValidationError(
            "base_day",
            f"base_day {msg.base_day} is in the future; expected at most {newest} ({date_of(newest)}, "
            "tomorrow in UTC)",
        )
    oldest = max(today - MAX_PAST_DAYS, config.retention_cutoff())
    if msg.base_day < oldest:
        # Older data would be purged by retention at once, so it is not taken in the first place.
        why = "the retention period" if oldest == config.retention_cutoff() else "the oldest batch accepted"
        raise ValidationError(
            "base_day",
            f"base_day {msg.base_day} is too old; expected at least {oldest} ({date_of(oldest)}, "
            f"{today - oldest} days ago: {why})",
        )
    _validate_epsilon(msg.ldp_epsilon_milli, config)
    checked = [_validate_signal(n, s, msg.base_day, config) for n, s in enumerate(msg.signals)]
    # A signal observed before the retention cut-off would be purged at once, like an old batch: it is not
    # taken in the first place (the base day alone does not say so, day_offset reaches 30 days back).
    cutoff = config.retention_cutoff()
    signals = tuple(s for s in checked if s.day >= cutoff)
    if not signals:
        raise ValidationError(
            "signals",
            f"signals: every signal was observed before {date_of(cutoff)}, the start of the retention "
            "period; nothing to store",
        )
    return Batch(
        batch_id=msg.batch_id,
        profile_id=msg.profile_id,
        region=msg.region,
        base_day=msg.base_day,
        signals=signals,
        digest=_digest(msg),
        epsilon_milli=msg.ldp_epsilon_milli,
        refuse_minor=config.policy.regions.minors_blocked(msg.region, config.clock()) is not None,
    )


def _validate_epsilon(milli: int, config: ServerConfig) -> None:
    """The declared randomized-response epsilon must be one the aggregator can de-bias, and no weaker
    than the deployment requires (``max_ldp_epsilon``)."""
    limit = MAX_EPSILON if config.max_ldp_epsilon is None else config.max_ldp_epsilon
    if milli > round(limit * EPSILON_SCALE):
        raise ValidationError(
            "ldp_epsilon_milli",
            f"ldp_epsilon_milli must be at most {round(limit * EPSILON_SCALE)} (epsilon {limit:g}); "
            f"got {milli}",
        )
    if milli == 0 and config.max_ldp_epsilon is not None:
        raise ValidationError(
            "ldp_epsilon_milli",
            f"this aggregator only accepts signals noised with local differential privacy (epsilon at most "
            f"{config.max_ldp_epsilon:g}); ldp_epsilon_milli is 0",
        )


def validate_audience(msg: signals_pb2.AudienceSizeRequest, config: ServerConfig) -> tuple[str, float]:
    """The category and score threshold of an audience query, or ``ValidationError``."""
    cid = validate_category("category_id", msg.category_id, config.policy)
    if not (math.isfinite(msg.min_score) and msg.min_score >= 0):
        raise ValidationError(
            "min_score", f"min_score must be a finite number of at least 0; got {msg.min_score}"
        )
    return cid, msg.min_score
