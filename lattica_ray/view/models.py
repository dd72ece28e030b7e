"""What the view shows, as pydantic models: members, exported actors, user-map entries, changes,
audit records. These are the only types the public API hands out; the CRDT stays inside.

The `*Record` models are what an author stores in the document (JSON strings under its own keys);
readers validate them and skip an entry that does not parse: one bad author cannot break the view.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from transport.identity import PeerId

MethodKind = Literal["sync", "async", "generator", "async_generator"]


class MemberStatus(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # missed heartbeats for `suspect_after`
    GONE = "gone"  # missed them for `gone_after`, or said goodbye: its actors are hidden


class Resources(BaseModel):
    """What a member offers to the mesh."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(0.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memory_bytes: int = Field(0, ge=0)
    custom: dict[str, float] = Field(default_factory=dict, description="e.g. {'TPU': 4}")


class ActorMethod(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    kind: MethodKind = "sync"


# -- stored by authors ---------------------------------------------------------------------------


class MemberRecord(BaseModel):
    """A member entry as its author stores it in the document."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    cluster_name: str
    addrs: list[str] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    versions: dict[str, str] = Field(default_factory=dict)
    started_at: float = Field(0.0, description="author clock, seconds")
    retires_older_runs: bool = Field(
        False,
        description="this run holds everything the author keeps: earlier runs are retired "
        "(their updates forgotten, the document rebuilt without them)",
    )


class ActorRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    class_name: str
    methods: list[ActorMethod] = Field(default_factory=list)
    exported_at: float = 0.0


class UserRecord(BaseModel):
    """One author's value for one key of a user map: last writer wins across authors by
    (version, author, incarnation); `deleted` is a tombstone so a delete also wins."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    value: Any = None
    version: int = Field(ge=0)
    deleted: bool = False


# -- shown to readers --------------------------------------------------------------------------


class Member(BaseModel):
    """One node of the mesh, as this replica sees it."""

    model_config = ConfigDict(frozen=True)

    peer_id: str
    cluster_name: str
    addrs: list[str]
    resources: Resources
    versions: dict[str, str]
    incarnation: int = Field(description="which run of the node; a restart starts a new one")
    started_at: float
    status: MemberStatus
    last_heartbeat: float | None = Field(
        None, description="the member's own clock at its latest heartbeat we received, seconds"
    )
    misbehaving: bool = Field(False, description="caught signing two different updates")

    @property
    def peer(self) -> PeerId:
        return PeerId.from_string(self.peer_id)


class ExportedActor(BaseModel):
    """An actor callable from anywhere in the mesh under `name`."""

    model_config = ConfigDict(frozen=True)

    name: str
    owner: str = Field(description="peer ID of the node that exports it")
    cluster_name: str
    class_name: str
    methods: list[ActorMethod]
    exported_at: float

    def method(self, name: str) -> ActorMethod | None:
        return next((m for m in self.methods if m.name == name), None)


class MapEntry(BaseModel):
    """One user-map key as resolved across authors, with who wrote the winning value."""

    model_config = ConfigDict(frozen=True)

    key: str
    value: Any
    author: str
    version: int


class AuditRecord(BaseModel):
    """Who wrote an entry, with the signed update that did: `envelope` re-verifies anywhere."""

    model_config = ConfigDict(frozen=True)

    entry: str
    author: str
    incarnation: int
    seq: int
    update_hash: str
    envelope_id: str
    envelope: bytes = Field(repr=False, description="the encoded SignedUpdate")


class EquivocationRecord(BaseModel):
    """An author signed two different updates with one sequence number; both are kept."""

    model_config = ConfigDict(frozen=True)

    author: str
    incarnation: int
    seq: int
    first: bytes = Field(repr=False, description="one encoded SignedUpdate")
    second: bytes = Field(repr=False, description="the other")


# -- changes, for subscribers ------------------------------------------------------------------


class MemberChanged(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["member"] = "member"
    change: Literal["joined", "updated", "restarted", "alive", "suspect", "gone", "misbehaving"]
    member: Member


class ActorChanged(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["actor"] = "actor"
    change: Literal["exported", "updated", "unexported", "hidden", "visible"]
    actor: ExportedActor


class MapChanged(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["map"] = "map"
    map: str
    key: str
    value: Any = None
    deleted: bool = False
    author: str


class Misbehaviour(BaseModel):
    """A peer sent something we refused (forged, out of rule, equivocating)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["misbehaviour"] = "misbehaviour"
    sender: str
    author: str | None = None
    reason: str


ViewChange = MemberChanged | ActorChanged | MapChanged | Misbehaviour
