from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HolePunch(_message.Message):
    __slots__ = ("type", "ObsAddrs", "mapping")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CONNECT: _ClassVar[HolePunch.Type]
        SYNC: _ClassVar[HolePunch.Type]
    CONNECT: HolePunch.Type
    SYNC: HolePunch.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBSADDRS_FIELD_NUMBER: _ClassVar[int]
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    type: HolePunch.Type
    ObsAddrs: _containers.RepeatedScalarFieldContainer[bytes]
    mapping: str
    def __init__(self, type: _Optional[_Union[HolePunch.Type, str]] = ..., ObsAddrs: _Optional[_Iterable[bytes]] = ..., mapping: _Optional[str] = ...) -> None: ...
