"""The RPC layer's one error family: each failure says which call failed, why, and what to do.

Every error carries a `StatusCode` (the wire status, numbered as gRPC numbers them), so an error
raised on the server reaches the caller as the same class. Handler exceptions arrive as
`RemoteError` with the remote type name, message and traceback *as text*: nothing from the
network is ever unpickled or re-raised as the original class.
"""

from __future__ import annotations

from enum import IntEnum


class StatusCode(IntEnum):
    """Final status of a call (values as in gRPC's status codes, for familiarity)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2  # the handler raised
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5  # no such method
    RESOURCE_EXHAUSTED = 8  # a limit was exceeded
    FAILED_PRECONDITION = 9  # wrong call kind for the method
    INTERNAL = 13  # protocol violation, undecodable message
    UNAVAILABLE = 14  # peer unreachable, vanished, or shutting down


class RpcError(Exception):
    """Base class of every error raised by `lattica_ray.rpc`.

    Errors that came from the remote side carry its exception type name and traceback as text
    (`remote_type`, `remote_traceback`); both are empty for errors raised locally.
    """

    code: StatusCode = StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        method: str = "",
        peer: object = None,
        remote_type: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.peer = peer
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        where = []
        if self.method:
            where.append(f"method {self.method!r}")
        if self.peer is not None:
            short = getattr(self.peer, "short", None)
            where.append(f"peer {short() if callable(short) else self.peer}")
        text = f"{self.message} ({', '.join(where)})" if where else self.message
        if self.remote_type and self.remote_type.rpartition(".")[2] != type(self).__name__:
            text = f"{self.remote_type}: {text}"  # the handler's own exception type
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
        return text


class RemoteError(RpcError):
    """The remote handler raised: `remote_type`, `message` and `remote_traceback` say how."""

    code = StatusCode.UNKNOWN


class Cancelled(RpcError):
    """The call was cancelled (by the caller, or because a service stopped)."""

    code = StatusCode.CANCELLED


class InvalidArgument(RpcError, ValueError):
    """The request could not be decoded or does not fit the method."""

    code = StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(RpcError, TimeoutError):
    """The call's deadline passed; the remote handler was cancelled."""

    code = StatusCode.DEADLINE_EXCEEDED


class MethodNotFound(RpcError, LookupError):
    """The remote has no method of that name registered."""

    code = StatusCode.NOT_FOUND


class ResourceExhausted(RpcError):
    """A configured limit (message size, concurrent calls) was exceeded; see the message."""

    code = StatusCode.RESOURCE_EXHAUSTED


class MessageTooLarge(ResourceExhausted):
    """A message is larger than `RpcConfig.max_message_size` on the sending or receiving side."""

    def __init__(
        self, size: int, limit: int, what: str = "message", *, method: str = "", peer: object = None
    ) -> None:
        super().__init__(
            f"{what} of {size} bytes exceeds the limit of {limit} bytes "
            "(send it as a stream of smaller messages, or raise max_message_size on both peers)",
            method=method,
            peer=peer,
        )
        self.size = size
        self.limit = limit


class WrongCallKind(RpcError):
    """The method was called as unary but streams (or the other way round)."""

    code = StatusCode.FAILED_PRECONDITION


class ProtocolError(RpcError):
    """The remote broke the RPC wire protocol (malformed or out-of-order frames)."""

    code = StatusCode.INTERNAL


class PeerUnavailable(RpcError, ConnectionError):
    """The peer could not be reached, vanished mid-call, or does not serve the RPC protocol."""

    code = StatusCode.UNAVAILABLE
    path_lost = False  # True: a stream broke after the call was sent (it may have run)


ERROR_BY_CODE: dict[StatusCode, type[RpcError]] = {
    StatusCode.CANCELLED: Cancelled,
    StatusCode.UNKNOWN: RemoteError,
    StatusCode.INVALID_ARGUMENT: InvalidArgument,
    StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    StatusCode.NOT_FOUND: MethodNotFound,
    StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    StatusCode.FAILED_PRECONDITION: WrongCallKind,
    StatusCode.INTERNAL: ProtocolError,
    StatusCode.UNAVAILABLE: PeerUnavailable,
}
