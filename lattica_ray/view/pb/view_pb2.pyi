from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignedUpdate(_message.Message):
    __slots__ = ("author", "incarnation", "seq", "update", "signature")
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    author: bytes
    incarnation: int
    seq: int
    update: bytes
    signature: bytes
    def __init__(self, author: _Optional[bytes] = ..., incarnation: _Optional[int] = ..., seq: _Optional[int] = ..., update: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("author", "incarnation", "counter", "timestamp_ms", "head_seq", "leaving", "signature")
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    author: bytes
    incarnation: int
    counter: int
    timestamp_ms: int
    head_seq: int
    leaving: bool
    signature: bytes
    def __init__(self, author: _Optional[bytes] = ..., incarnation: _Optional[int] = ..., counter: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., head_seq: _Optional[int] = ..., leaving: _Optional[bool] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EquivocationProof(_message.Message):
    __slots__ = ("first", "second")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    first: SignedUpdate
    second: SignedUpdate
    def __init__(self, first: _Optional[_Union[SignedUpdate, _Mapping]] = ..., second: _Optional[_Union[SignedUpdate, _Mapping]] = ...) -> None: ...

class ChainHead(_message.Message):
    __slots__ = ("client_id", "seq")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    seq: int
    def __init__(self, client_id: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class Gossip(_message.Message):
    __slots__ = ("updates", "heartbeats", "proofs")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    PROOFS_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[SignedUpdate]
    heartbeats: _containers.RepeatedCompositeFieldContainer[Heartbeat]
    proofs: _containers.RepeatedCompositeFieldContainer[EquivocationProof]
    def __init__(self, updates: _Optional[_Iterable[_Union[SignedUpdate, _Mapping]]] = ..., heartbeats: _Optional[_Iterable[_Union[Heartbeat, _Mapping]]] = ..., proofs: _Optional[_Iterable[_Union[EquivocationProof, _Mapping]]] = ...) -> None: ...

class SyncHello(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    def __init__(self, digest: _Optional[bytes] = ...) -> None: ...

class SyncVector(_message.Message):
    __slots__ = ("in_sync", "heads")
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    in_sync: bool
    heads: _containers.RepeatedCompositeFieldContainer[ChainHead]
    def __init__(self, in_sync: _Optional[bool] = ..., heads: _Optional[_Iterable[_Union[ChainHead, _Mapping]]] = ...) -> None: ...

class SyncChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class SyncDone(_message.Message):
    __slots__ = ("updates", "proofs")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    PROOFS_FIELD_NUMBER: _ClassVar[int]
    updates: int
    proofs: _containers.RepeatedCompositeFieldContainer[EquivocationProof]
    def __init__(self, updates: _Optional[int] = ..., proofs: _Optional[_Iterable[_Union[EquivocationProof, _Mapping]]] = ...) -> None: ...

class ViewMessage(_message.Message):
    __slots__ = ("gossip", "hello", "vector", "chunk", "done")
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    gossip: Gossip
    hello: SyncHello
    vector: SyncVector
    chunk: SyncChunk
    done: SyncDone
    def __init__(self, gossip: _Optional[_Union[Gossip, _Mapping]] = ..., hello: _Optional[_Union[SyncHello, _Mapping]] = ..., vector: _Optional[_Union[SyncVector, _Mapping]] = ..., chunk: _Optional[_Union[SyncChunk, _Mapping]] = ..., done: _Optional[_Union[SyncDone, _Mapping]] = ...) -> None: ...
