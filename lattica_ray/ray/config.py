"""Settings of the Ray face: what `lattica_ray.init()` starts, and its limits."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_LISTEN = "/ip4/0.0.0.0/udp/0/quic-v1"
MiB = 1024 * 1024


class LatticaConfig(BaseModel):
    """One LatticaActor's settings; `identity()` is what `init()` compares on re-runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cluster: str = Field(default_factory=socket.gethostname, min_length=1)
    """The name other clusters use for this one (`get_actor(name, cluster=...)`)."""
    bootstrap: tuple[str, ...] = ()
    """Multiaddrs (ending in /p2p/<peer id>) of peers to join the mesh through."""
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    mesh: Literal["node", "memory"] = "node"
    """"node": a real `Node` on the network. "memory": an in-process mesh for single-cluster
    use and tests (nothing leaves the machine's LatticaActor)."""
    namespace: str = "lattica_ray"
    """Ray namespace of the LatticaActors (detached, named)."""
    control_concurrency: int = Field(default=64, ge=1)
    """Concurrent control calls per LatticaActor (small calls, lookups, heartbeats)."""
    bulk_concurrency: int = Field(default=8, ge=1)
    """Concurrent bulk calls per LatticaActor (large arguments, object transfers), so that
    transfers never starve the control group."""
    bulk_argument_bytes: int = Field(default=1 * MiB, ge=0)
    """Calls whose arguments exceed this run in the bulk group (and, on the serving side, go
    through Ray rather than a direct call)."""
    direct_calls: bool = True
    """Run calls to actors made by `@lattica_ray.remote` in the actor's own process (one Ray
    actor call fewer per mesh call; see `direct_call`). False: always through Ray."""
    pipeline: bool = True
    """Processes on this node send small unary calls to the LatticaActor over its pipe (a
    local Unix socket) while Ray delivers the task that returns the result, so the remote call
    starts without waiting for Ray (see `pipeline`). False: every call waits for its Ray task."""
    pipeline_max_unclaimed: int = Field(default=10_000, ge=1)
    """Most pipelined calls held while no task has claimed their result; beyond, requests are
    refused (`CallLimitExceeded`)."""
    pipeline_claim_timeout: float = Field(default=60.0, gt=0)
    """A pipelined call whose result no task claimed within this many seconds of its request
    (its caller died, or its task was cancelled before it ran) is cancelled and dropped."""
    pipeline_arrival_timeout: float = Field(default=30.0, gt=0)
    """How long a result task waits for its call's request before failing with `CallLost`."""
    niceness: int | None = Field(default=0, ge=-20, le=19)
    """The LatticaActor's scheduling niceness: Ray starts workers at 15, below its daemons, and
    every remote call waits on the LatticaActor, a daemon too. Needs CAP_SYS_NICE (root) or
    RLIMIT_NICE to go below 15; without them Ray's stays. None: leave Ray's."""
    start_timeout: float = Field(default=60.0, gt=0)
    call_timeout: float | None = Field(default=None, gt=0)
    """Default per-call timeout of remote actor calls (None: wait as long as the peer lives)."""
    object_chunk_bytes: int = Field(default=4 * MiB, ge=64 * 1024)
    """Size of the ranges a large object is fetched in (also the largest read served)."""
    object_parallel_providers: int = Field(default=4, ge=1)
    """How many providers a large object is fetched from at once."""
    object_cache_bytes: int = Field(default=4096 * MiB, ge=0)
    """Fetched (not own) objects are evicted, least recently used first, above this."""
    object_progress_bytes: int = Field(default=64 * MiB, ge=0)
    """Fetches larger than this log their progress."""
    max_value_depth: int = Field(default=64, ge=1)
    """Deepest nesting of lists/dicts accepted in an argument or result."""

    def identity(self) -> dict[str, object]:
        """The settings that make two LatticaActors different meshes (not mere limits)."""
        return {
            "cluster": self.cluster,
            "bootstrap": list(self.bootstrap),
            "listen": list(self.listen),
            "mesh": self.mesh,
        }
