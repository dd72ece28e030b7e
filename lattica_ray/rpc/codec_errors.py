"""The Arrow codec's error family: what could not be encoded, or why a message was refused."""

from __future__ import annotations


class CodecError(ValueError):
    """Base class of every error raised by `lattica_ray.rpc.codec`."""


class UnsupportedType(CodecError):
    """A value of a type (or dtype) the codec does not carry; it never falls back to pickle."""


class LimitExceeded(CodecError):
    """A message (or a value being encoded) is bigger or deeper than a `CodecLimits` allows."""

    def __init__(self, what: str, value: int, limit: int, setting: str) -> None:
        super().__init__(
            f"{what} is {value}, above the limit of {limit}; "
            f"raise CodecLimits.{setting} on the receiving side if this is legitimate"
        )
        self.what = what
        self.value = value
        self.limit = limit
        self.setting = setting


class MalformedMessage(CodecError):
    """A received message is truncated, corrupt or inconsistent; nothing of it was used."""
