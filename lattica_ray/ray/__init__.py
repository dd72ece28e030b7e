"""The Ray face: remote actors that appear local, and global objects, across Ray clusters.

The only package of lattica-ray that imports `ray` (lazily: `protocol`, `service`, `objects`,
`mesh` and `memory_mesh` import without it). Public names: `init`, `shutdown`,
`remote`, `export`, `get_actor`, `put`, `get` (re-exported by `lattica_ray`), `status`.
"""

from typing import TYPE_CHECKING, Any

from lattica_ray.ray.config import LatticaConfig
from lattica_ray.ray.errors import (
    ActorNotFound,
    CallLimitExceeded,
    CallLost,
    ConfigMismatch,
    MethodNotExported,
    NotInitialized,
    ObjectCorrupt,
    ObjectNotFound,
    PeerUnreachable,
    RayFaceError,
    RemoteActorError,
    RemoteCallTimeout,
    UnsupportedValue,
)
from lattica_ray.ray.protocol import GlobalRef

if TYPE_CHECKING:
    from lattica_ray.ray.api import export, get, get_actor, init, put, remote, shutdown, status
    from lattica_ray.ray.proxy import RemoteActorHandle

# Names that need Ray load it on first use, so the pure modules import without Ray.
_LAZY = {
    "export": "api",
    "get": "api",
    "get_actor": "api",
    "init": "api",
    "put": "api",
    "remote": "api",
    "shutdown": "api",
    "status": "api",
    "RemoteActorHandle": "proxy",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lattica_ray.ray' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"lattica_ray.ray.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ActorNotFound",
    "CallLimitExceeded",
    "CallLost",
    "ConfigMismatch",
    "GlobalRef",
    "LatticaConfig",
    "MethodNotExported",
    "NotInitialized",
    "ObjectCorrupt",
    "ObjectNotFound",
    "PeerUnreachable",
    "RayFaceError",
    "RemoteActorError",
    "RemoteActorHandle",
    "RemoteCallTimeout",
    "UnsupportedValue",
    "export",
    "get",
    "get_actor",
    "init",
    "put",
    "remote",
    "shutdown",
    "status",
]
