"""The Ray face's pure logic: actor records, method tables, what values may cross clusters,
reply envelopes, global object references and content IDs. No Ray, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lattica_ray.ray.errors import (
    WIRE_ERRORS,
    MethodNotExported,
    RayFaceError,
    RemoteActorError,
    UnsupportedValue,
)

MethodKind = Literal["unary", "stream"]
METHOD_KINDS = ("unary", "stream")

# RPC method names the LatticaActors serve each other.
ACTOR_CALL = "lattica.actor.call"
ACTOR_STREAM = "lattica.actor.stream"
OBJECT_READ = "lattica.object.read"

GLOBAL_REF_TAG = "__lattica_global_ref__"


# -- exported actors --------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorRecord:
    """An exported actor as the cluster view lists it: who serves it and what may be called."""

    name: str
    cluster: str
    owner: str  # peer ID (text) of the LatticaActor that serves it
    methods: Mapping[str, MethodKind] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cluster": self.cluster,
            "owner": self.owner,
            "methods": dict(self.methods),
        }

    @classmethod
    def from_wire(cls, data: Any) -> ActorRecord:
        """Parse a record from the view; raise `ValueError` on anything malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"actor record must be a mapping, got {type(data).__name__}")
        try:
            name, cluster, owner, methods = (
                data["name"],
                data["cluster"],
                data["owner"],
                data["methods"],
            )
        except KeyError as exc:
            raise ValueError(f"actor record lacks {exc.args[0]!r}") from None
        for key, value in (("name", name), ("cluster", cluster), ("owner", owner)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"actor record {key} must be a non-empty string")
        if not isinstance(methods, Mapping) or not all(
            isinstance(k, str) and v in METHOD_KINDS for k, v in methods.items()
        ):
            raise ValueError(f"actor record methods must map names to {METHOD_KINDS}")
        return cls(name, cluster, owner, dict(methods))

    def kind_of(self, method: str) -> MethodKind:
        try:
            return self.methods[method]
        except KeyError:
            raise MethodNotExported(
                f"actor {self.name!r} on cluster {self.cluster!r} exports no method "
                f"{method!r}; exported: {sorted(self.methods) or 'none'}",
                actor=self.name,
                method=method,
            ) from None


def method_table(
    methods: Iterable[tuple[str, bool]], include: Iterable[str] | None = None
) -> dict[str, MethodKind]:
    """Exported methods from (name, is_generator) pairs: public ones, or exactly `include`."""
    public = {
        name: ("stream" if is_generator else "unary")
        for name, is_generator in methods
        if not name.startswith("_")
    }
    if include is None:
        return public
    wanted = list(include)
    missing = [name for name in wanted if name not in public]
    if missing:
        raise MethodNotExported(
            f"cannot export {missing}: not public methods of the actor (public: {sorted(public)})"
        )
    return {name: public[name] for name in wanted}


# -- values that cross clusters ---------------------------------------------------------------


@dataclass(frozen=True)
class GlobalRef:
    """A reference to an object put with `lattica_ray.put`: any cluster can `get` it.

    `cid` is the content ID (CIDv1 raw sha2-256), so a fetched copy is verified; `providers`
    are peers known to hold it (hints: the DHT is asked too).
    """

    cid: str
    size: int
    providers: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"GlobalRef({self.cid[:16]}…, {self.size} bytes)"

    def to_wire(self) -> dict[str, Any]:
        return {GLOBAL_REF_TAG: [self.cid, self.size, list(self.providers)]}

    @classmethod
    def from_wire(cls, body: Any) -> GlobalRef:
        if not (
            isinstance(body, list | tuple)
            and len(body) == 3
            and isinstance(body[0], str)
            and isinstance(body[1], int)
            and body[1] >= 0
            and isinstance(body[2], list | tuple)
            and all(isinstance(p, str) for p in body[2])
        ):
            raise ValueError("malformed global reference")
        parse_content_id(body[0])
        return cls(body[0], body[1], tuple(body[2]))


_SCALARS = (type(None), bool, int, float, str, bytes)
ALLOWED_DESCRIPTION = (
    "None, bool, int, float, str, bytes, numpy arrays and scalars (no object dtype), "
    "torch tensors, pyarrow arrays/tables/record batches, GlobalRef, and lists, tuples and "
    "dicts with str keys of these"
)


def _is_array_leaf(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            return not value.dtype.hasobject
        if isinstance(value, numpy.generic):
            return not isinstance(value, numpy.object_)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return True
    pyarrow = sys.modules.get("pyarrow")
    return pyarrow is not None and isinstance(
        value, pyarrow.Array | pyarrow.ChunkedArray | pyarrow.Table | pyarrow.RecordBatch
    )


def to_wire_value(
    value: Any,
    *,
    path: str = "value",
    max_depth: int = 64,
    keep: Callable[[Any], bool] | None = None,
) -> Any:
    """`value` as the codec sends it: checked against the allow-list, GlobalRefs tagged.

    Raises `UnsupportedValue` naming where the offending value sits. `keep(v)` lets a caller
    pass through values it resolves itself later (local Ray ObjectRefs).
    """

    def walk(v: Any, where: str, depth: int) -> Any:
        if isinstance(v, _SCALARS) or _is_array_leaf(v):
            if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64:
                raise UnsupportedValue(f"{where}: integer {v} does not fit in 64 bits")
            return v
        if isinstance(v, GlobalRef):
            return v.to_wire()
        if keep is not None and keep(v):
            return v
        if depth >= max_depth:
            raise UnsupportedValue(f"{where}: nested deeper than {max_depth} levels")
        if isinstance(v, list):
            return [walk(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
        if isinstance(v, tuple) and type(v) is tuple:
            return tuple(walk(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v))
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise UnsupportedValue(f"{where}: dict key {k!r} is not a str")
                if k == GLOBAL_REF_TAG:
                    raise UnsupportedValue(f"{where}: dict key {k!r} is reserved")
                out[k] = walk(x, f"{where}[{k!r}]", depth + 1)
            return out
        raise UnsupportedValue(
            f"{where}: a {type(v).__module__}.{type(v).__qualname__} cannot cross clusters "
            f"(only data is sent, never code or pickles). Allowed: {ALLOWED_DESCRIPTION}. "
            "Convert it (e.g. to a numpy array or dict), or put it with lattica_ray.put() "
            "on its own cluster and pass the GlobalRef."
        )

    return walk(value, path, 0)


def from_wire_value(value: Any) -> Any:
    """Undo `to_wire_value` on a decoded value: tagged dicts become GlobalRefs again."""
    if isinstance(value, list):
        return [from_wire_value(x) for x in value]
    if isinstance(value, tuple):
        return tuple(from_wire_value(x) for x in value)
    if isinstance(value, dict):
        if len(value) == 1 and GLOBAL_REF_TAG in value:
            return GlobalRef.from_wire(value[GLOBAL_REF_TAG])
        return {k: from_wire_value(x) for k, x in value.items()}
    return value


def payload_bytes(value: Any) -> int:
    """A cheap estimate of the encoded size of `value` (to pick the bulk concurrency group)."""
    if isinstance(value, bytes | str):
        return len(value)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, list | tuple):
        return sum(payload_bytes(x) for x in value)
    if isinstance(value, dict):
        return sum(payload_bytes(x) for x in value.values())
    return 8


# -- reply envelopes --------------------------------------------------------------------------
# A remote method's own exception is data (an "error" envelope), not an RPC failure: the RPC
# layer's errors then always mean the call itself failed (unreachable, timeout, cancelled).


def ok_envelope(value: Any) -> dict[str, Any]:
    return {"ok": value}


def error_envelope(error_type: str, message: str, traceback_text: str = "") -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message, "traceback": traceback_text}}


def envelope_for(exc: BaseException, traceback_text: str = "") -> dict[str, Any]:
    if isinstance(exc, RayFaceError):
        return error_envelope(type(exc).__name__, exc.message, traceback_text)
    return error_envelope(type(exc).__name__, str(exc), traceback_text)


def open_envelope(envelope: Any, *, actor: str = "", method: str = "", cluster: str = "") -> Any:
    """The value of an "ok" envelope; raise the error of an "error" envelope."""
    if isinstance(envelope, dict) and len(envelope) == 1:
        if "ok" in envelope:
            return envelope["ok"]
        error = envelope.get("error")
        if isinstance(error, dict) and all(
            isinstance(error.get(k), str) for k in ("type", "message", "traceback")
        ):
            local = WIRE_ERRORS.get(error["type"])
            if local is not None:
                raise local(error["message"], actor=actor, method=method, cluster=cluster)
            raise RemoteActorError.of(
                error["type"],
                error["message"],
                error["traceback"],
                actor=actor,
                method=method,
                cluster=cluster,
            )
    raise RemoteActorError.of(
        "ProtocolError",
        f"malformed reply envelope of type {type(envelope).__name__}",
        "",
        actor=actor,
        method=method,
        cluster=cluster,
    )


# -- content IDs and ranges -------------------------------------------------------------------
# CIDv1, codec raw (0x55), multihash sha2-256 (0x12, 32 bytes), multibase base32 ("b"): the
# form IPFS and libp2p DHTs key provider records on.
_CID_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])


def content_id(data: bytes | bytearray | memoryview) -> str:
    """The CID of `data` as text (hashing large data? run it in a thread)."""
    digest = hashlib.sha256(data).digest()
    return "b" + base64.b32encode(_CID_PREFIX + digest).decode().lower().rstrip("=")


def parse_content_id(cid: str) -> bytes:
    """The sha2-256 digest inside a CID produced by `content_id`; `ValueError` otherwise."""
    if not isinstance(cid, str) or not cid.startswith("b"):
        raise ValueError(f"not a base32 CIDv1: {cid!r}")
    body = cid[1:].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise ValueError(f"not a base32 CIDv1: {cid!r}") from None
    if len(raw) != len(_CID_PREFIX) + 32 or not raw.startswith(_CID_PREFIX):
        raise ValueError(f"not a raw sha2-256 CIDv1: {cid!r}")
    return raw[len(_CID_PREFIX) :]


def split_ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    """(offset, length) ranges covering `size` bytes in chunks of at most `chunk`."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    return [(offset, min(chunk, size - offset)) for offset in range(0, size, chunk)]
