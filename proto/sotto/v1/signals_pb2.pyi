from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Signal(_message.Message):
    __slots__ = ("category_id", "weight_level", "day_offset")
    CATEGORY_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_LEVEL_FIELD_NUMBER: _ClassVar[int]
    DAY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    category_id: str
    weight_level: int
    day_offset: int
    def __init__(self, category_id: _Optional[str] = ..., weight_level: _Optional[int] = ..., day_offset: _Optional[int] = ...) -> None: ...

class SignalBatch(_message.Message):
    __slots__ = ("batch_id", "profile_id", "region", "taxonomy_version", "base_day", "signals", "ldp_epsilon_milli")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    TAXONOMY_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_DAY_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    LDP_EPSILON_MILLI_FIELD_NUMBER: _ClassVar[int]
    batch_id: bytes
    profile_id: str
    region: str
    taxonomy_version: str
    base_day: int
    signals: _containers.RepeatedCompositeFieldContainer[Signal]
    ldp_epsilon_milli: int
    def __init__(self, batch_id: _Optional[bytes] = ..., profile_id: _Optional[str] = ..., region: _Optional[str] = ..., taxonomy_version: _Optional[str] = ..., base_day: _Optional[int] = ..., signals: _Optional[_Iterable[_Union[Signal, _Mapping]]] = ..., ldp_epsilon_milli: _Optional[int] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("batch_id", "duplicate", "applied_signals")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    batch_id: bytes
    duplicate: bool
    applied_signals: int
    def __init__(self, batch_id: _Optional[bytes] = ..., duplicate: _Optional[bool] = ..., applied_signals: _Optional[int] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("profile_id", "top_k")
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    profile_id: str
    top_k: int
    def __init__(self, profile_id: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class CategoryScore(_message.Message):
    __slots__ = ("category_id", "name", "tier1", "score")
    CATEGORY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER1_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    category_id: str
    name: str
    tier1: str
    score: float
    def __init__(self, category_id: _Optional[str] = ..., name: _Optional[str] = ..., tier1: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Profile(_message.Message):
    __slots__ = ("profile_id", "taxonomy_version", "as_of_day", "scores", "batches")
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    TAXONOMY_VERSION_FIELD_NUMBER: _ClassVar[int]
    AS_OF_DAY_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    profile_id: str
    taxonomy_version: str
    as_of_day: int
    scores: _containers.RepeatedCompositeFieldContainer[CategoryScore]
    batches: int
    def __init__(self, profile_id: _Optional[str] = ..., taxonomy_version: _Optional[str] = ..., as_of_day: _Optional[int] = ..., scores: _Optional[_Iterable[_Union[CategoryScore, _Mapping]]] = ..., batches: _Optional[int] = ...) -> None: ...

class DeleteProfileRequest(_message.Message):
    __slots__ = ("profile_id",)
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    profile_id: str
    def __init__(self, profile_id: _Optional[str] = ...) -> None: ...

class DeleteProfileResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class AudienceSizeRequest(_message.Message):
    __slots__ = ("category_id", "min_score")
    CATEGORY_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    category_id: str
    min_score: float
    def __init__(self, category_id: _Optional[str] = ..., min_score: _Optional[float] = ...) -> None: ...

class AudienceSizeResponse(_message.Message):
    __slots__ = ("too_small", "profiles", "min_audience", "as_of_day", "estimated_signals", "estimate_low", "estimate_high", "confidence", "noised_signals")
    TOO_SMALL_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    MIN_AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    AS_OF_DAY_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_LOW_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_HIGH_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    NOISED_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    too_small: bool
    profiles: int
    min_audience: int
    as_of_day: int
    estimated_signals: float
    estimate_low: float
    estimate_high: float
    confidence: float
    noised_signals: int
    def __init__(self, too_small: _Optional[bool] = ..., profiles: _Optional[int] = ..., min_audience: _Optional[int] = ..., as_of_day: _Optional[int] = ..., estimated_signals: _Optional[float] = ..., estimate_low: _Optional[float] = ..., estimate_high: _Optional[float] = ..., confidence: _Optional[float] = ..., noised_signals: _Optional[int] = ...) -> None: ...
