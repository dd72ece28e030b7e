"""lattica-ray: Ray clusters bridged across NATs and firewalls."""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from lattica_ray.node import Node

if TYPE_CHECKING:
    from lattica_ray.ray import export, get, get_actor, init, put, remote, shutdown, status

# The Ray face loads on first use, so `import lattica_ray` works where Ray is not installed.
_RAY_FACE = ("export", "get", "get_actor", "init", "put", "remote", "shutdown", "status")


def __getattr__(name: str) -> Any:
    if name not in _RAY_FACE:
        raise AttributeError(f"module 'lattica_ray' has no attribute {name!r}")
    import lattica_ray.ray as ray_face

    value = getattr(ray_face, name)
    globals()[name] = value
    return value


__all__ = [
    "Node",
    "__version__",
    "export",
    "get",
    "get_actor",
    "init",
    "put",
    "remote",
    "shutdown",
    "status",
]
