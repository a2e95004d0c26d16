from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("item", "timestamp")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    item: str
    timestamp: int
    def __init__(self, item: _Optional[str] = ..., timestamp: _Optional[int] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("history", "context", "k")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    history: _containers.RepeatedCompositeFieldContainer[Event]
    context: _containers.ScalarMap[str, str]
    k: int
    def __init__(self, history: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., context: _Optional[_Mapping[str, str]] = ..., k: _Optional[int] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("item", "score", "stage", "title")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    item: str
    score: float
    stage: str
    title: str
    def __init__(self, item: _Optional[str] = ..., score: _Optional[float] = ..., stage: _Optional[str] = ..., title: _Optional[str] = ...) -> None: ...

class RecommendReply(_message.Message):
    __slots__ = ("items", "bundle_version", "bundle_hash")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_HASH_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Recommendation]
    bundle_version: int
    bundle_hash: str
    def __init__(self, items: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., bundle_version: _Optional[int] = ..., bundle_hash: _Optional[str] = ...) -> None: ...

class RecommendManyRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecommendRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RecommendRequest, _Mapping]]] = ...) -> None: ...

class RecommendManyReply(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[RecommendReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[RecommendReply, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoReply(_message.Message):
    __slots__ = ("bundle_version", "bundle_hash", "epsilon", "delta", "stages", "part_hashes", "epsilon_scope")
    class PartHashesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_HASH_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PART_HASHES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SCOPE_FIELD_NUMBER: _ClassVar[int]
    bundle_version: int
    bundle_hash: str
    epsilon: float
    delta: float
    stages: _containers.RepeatedScalarFieldContainer[str]
    part_hashes: _containers.ScalarMap[str, str]
    epsilon_scope: str
    def __init__(self, bundle_version: _Optional[int] = ..., bundle_hash: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., stages: _Optional[_Iterable[str]] = ..., part_hashes: _Optional[_Mapping[str, str]] = ..., epsilon_scope: _Optional[str] = ...) -> None: ...
