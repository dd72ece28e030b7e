"""The cluster view: a signed, CRDT-replicated picture of the mesh (members, exported actors,
user maps), kept in step between nodes by protocol `/lattica-ray/view/1`.

    view = ClusterView(host, key, ViewConfig(), cluster_name="lab")
    await view.start()
    view.export_actor("learner", "Learner", {"act": "async"})
    view.map("rl").set("policy_version", 7)
    for member in view.members(): ...
    async for change in view.subscribe(): ...
"""

from lattica_ray.view.config import ViewConfig
from lattica_ray.view.errors import (
    InvalidEnvelope,
    InvalidValue,
    MalformedMessage,
    MalformedUpdate,
    MissingDependency,
    SubscriptionOverflow,
    ViewError,
    ViewNotStarted,
    WriteRuleViolation,
)
from lattica_ray.view.models import (
    ActorChanged,
    ActorMethod,
    AuditRecord,
    EquivocationRecord,
    ExportedActor,
    MapChanged,
    MapEntry,
    Member,
    MemberChanged,
    MemberStatus,
    Misbehaviour,
    Resources,
    ViewChange,
)
from lattica_ray.view.protocol import PROTOCOL_ID
from lattica_ray.view.service import ClusterView, UserMap, ViewSubscription

__all__ = [
    "PROTOCOL_ID",
    "ActorChanged",
    "ActorMethod",
    "AuditRecord",
    "ClusterView",
    "EquivocationRecord",
    "ExportedActor",
    "InvalidEnvelope",
    "InvalidValue",
    "MalformedMessage",
    "MalformedUpdate",
    "MapChanged",
    "MapEntry",
    "Member",
    "MemberChanged",
    "MemberStatus",
    "Misbehaviour",
    "MissingDependency",
    "Resources",
    "SubscriptionOverflow",
    "UserMap",
    "ViewChange",
    "ViewConfig",
    "ViewError",
    "ViewNotStarted",
    "ViewSubscription",
    "WriteRuleViolation",
]
