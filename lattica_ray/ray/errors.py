"""The Ray face's one error family: each says which actor, method or object failed, and why.

Every error pickles with its fields, because Ray carries them from the LatticaActor to the driver
(as the cause of a `RayTaskError`, so `except RemoteActorError` works around `ray.get`).
"""

from __future__ import annotations

from typing import Any


class RayFaceError(Exception):
    """Base class of every error raised by `lattica_ray.ray`."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.__dict__.update(fields)

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {k: v for k, v in self.__dict__.items() if k != "message"}
        return (_rebuild, (type(self), self.message, fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[RayFaceError], message: str, fields: dict[str, Any]) -> RayFaceError:
    error = cls.__new__(cls)
    RayFaceError.__init__(error, message, **fields)
    return error


class NotInitialized(RayFaceError):
    """`lattica_ray.init()` has not been called in this process (or Ray is not up)."""


class ConfigMismatch(RayFaceError):
    """`init()` asked for settings other than those the running LatticaActor has."""


class ActorNotFound(RayFaceError, LookupError):
    """No cluster exports an actor of that name (or several do and no cluster was given)."""


class MethodNotExported(RayFaceError, AttributeError):
    """The method does not exist on the exported actor, is private, or has the wrong kind."""


class UnsupportedValue(RayFaceError, TypeError):
    """A value cannot cross clusters: only data (numbers, text, bytes, arrays, tensors, Arrow
    tables, GlobalRefs and lists/tuples/dicts of them) is sent; code and pickles never are."""


class RemoteActorError(RayFaceError):
    """The remote method raised. The remote type, message and traceback arrive as text.

    Fields: `remote_type`, `remote_message`, `remote_traceback`, `actor`, `method`, `cluster`.
    """

    @classmethod
    def of(
        cls,
        remote_type: str,
        remote_message: str,
        remote_traceback: str,
        *,
        actor: str = "",
        method: str = "",
        cluster: str = "",
    ) -> RemoteActorError:
        where = f"{actor}.{method}" if actor else method or "remote call"
        if cluster:
            where += f" on cluster {cluster!r}"
        text = f"{where} raised {remote_type}: {remote_message}"
        if remote_traceback:
            text += "\n--- remote traceback ---\n" + remote_traceback.rstrip()
        return cls(
            text,
            remote_type=remote_type,
            remote_message=remote_message,
            remote_traceback=remote_traceback,
            actor=actor,
            method=method,
            cluster=cluster,
        )


class RemoteCallTimeout(RayFaceError, TimeoutError):
    """The remote call did not finish within its timeout; the remote handler was cancelled."""


class PeerUnreachable(RayFaceError, ConnectionError):
    """The machine that owns the actor or object could not be reached."""


class CallLost(RayFaceError):
    """A pipelined call's request and its result task did not meet on this machine (the
    LatticaActor restarted in between, the request never came, or the result was not collected
    in time); the message says which, and whether the call may have run."""


class CallLimitExceeded(RayFaceError):
    """Too many pipelined calls were waiting for their results to be collected; the call was
    not made (see `LatticaConfig.pipeline_max_unclaimed`)."""


class ObjectNotFound(RayFaceError, LookupError):
    """No provider of a global object could be found or reached."""


class ObjectCorrupt(RayFaceError):
    """Fetched bytes do not hash to the object's content ID; they were discarded."""


# Errors that travel as data in a reply envelope and are re-raised as themselves on the caller.
WIRE_ERRORS: dict[str, type[RayFaceError]] = {
    cls.__name__: cls
    for cls in (ActorNotFound, MethodNotExported, UnsupportedValue, ObjectNotFound)
}
