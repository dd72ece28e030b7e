"""The view as text tables, for `lattica-ray status` and logs: members, then exported actors."""

from __future__ import annotations

from collections.abc import Sequence

from lattica_ray.view.models import ExportedActor, Member

GIB = 1024**3


def _table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headings]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headings, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:g}"


def _age(now: float, then: float | None) -> str:
    if then is None:
        return "-"
    seconds = max(0.0, now - then)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def members_table(members: Sequence[Member], now: float) -> str:
    rows = []
    for m in members:
        status = m.status.value + (" (misbehaving)" if m.misbehaving else "")
        rows.append(
            [
                m.peer_id,
                m.cluster_name,
                status,
                _number(m.resources.cpus),
                _number(m.resources.gpus),
                f"{m.resources.memory_bytes / GIB:.1f}",
                _age(now, m.last_heartbeat),
                m.versions.get("lattica-ray", "?"),
                m.addrs[0] if m.addrs else "-",
            ]
        )
    headings = ["PEER", "CLUSTER", "STATUS", "CPUS", "GPUS", "MEM GiB", "HEARTBEAT", "VERSION"]
    return _table([*headings, "ADDRESS"], rows)


def actors_table(actors: Sequence[ExportedActor]) -> str:
    rows = [
        [
            a.name,
            a.cluster_name,
            a.class_name,
            a.owner,
            ", ".join(f"{m.name}({m.kind})" for m in a.methods) or "-",
        ]
        for a in actors
    ]
    return _table(["ACTOR", "CLUSTER", "CLASS", "OWNER", "METHODS"], rows)


def status_text(members: Sequence[Member], actors: Sequence[ExportedActor], now: float) -> str:
    """What `lattica-ray status` prints: `status_text(view.members(), view.actors(), time())`."""
    return f"{members_table(members, now)}\n\n{actors_table(actors)}"
