"""Tensor RPC between peers on `/lattica-ray/rpc/1`: unary and streaming calls, Arrow-encoded.

Usage (the node exposes a started service as `node.rpc`)::

    rpc = RpcService(host)
    await rpc.start()

    @rpc.method("add")
    async def add(a: int, b: int) -> int:
        return a + b

    await rpc.call(peer_id, "add", 1, 2, timeout=5.0)  # -> 3
    async for chunk in rpc.stream(peer_id, "weights", timeout=60.0):
        ...
"""

from lattica_ray.rpc.config import RpcConfig
from lattica_ray.rpc.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    MessageTooLarge,
    MethodNotFound,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
    ResourceExhausted,
    RpcError,
    StatusCode,
    WrongCallKind,
)
from lattica_ray.rpc.protocol import PROTOCOL_ID, CallKind
from lattica_ray.rpc.registry import CallContext, current_call
from lattica_ray.rpc.service import ResponseStream, RpcService

__all__ = [
    "PROTOCOL_ID",
    "CallContext",
    "CallKind",
    "Cancelled",
    "DeadlineExceeded",
    "InvalidArgument",
    "MessageTooLarge",
    "MethodNotFound",
    "PeerUnavailable",
    "ProtocolError",
    "RemoteError",
    "ResourceExhausted",
    "ResponseStream",
    "RpcConfig",
    "RpcError",
    "RpcService",
    "StatusCode",
    "WrongCallKind",
    "current_call",
]
