"""Lab records under /run/netlab, and removal of labs whose owner died.

Every lab writes ``/run/netlab/<id>.json`` *before* it creates anything, naming its owner
process (pid + kernel start time, so a reused pid is not mistaken for the owner). A lab whose
owner is gone (a killed pytest, a crashed script) is stale: :func:`cleanup_stale` kills the
processes left in its namespaces and deletes them. Labs started by the CLI have no owner and
live until ``python -m tests.netlab down``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.netlab.netns import delete_namespaces, list_namespaces, process_start_time

logger = logging.getLogger(__name__)

STATE_DIR = Path(os.environ.get("NETLAB_STATE_DIR", "/run/netlab"))
NAMESPACE_PREFIX = "netlab-"  # every lab namespace is netlab-<id>-<node>


@dataclass
class LabRecord:
    """What a running lab needs on disk so another process can find, change or remove it."""

    id: str
    owner_pid: int | None
    owner_start: int | None
    topology: list[dict[str, object]] = field(default_factory=list)
    links: dict[str, dict[str, dict[str, object]]] = field(default_factory=dict)
    cut: list[str] = field(default_factory=list)
    queued_netns: list[str] = field(default_factory=list)
    linkemu_pid: int | None = None
    linkemu_start: int | None = None

    @property
    def path(self) -> Path:
        return STATE_DIR / f"{self.id}.json"

    @property
    def netns_prefix(self) -> str:
        return f"{NAMESPACE_PREFIX}{self.id}-"

    def owner_alive(self) -> bool:
        if self.owner_pid is None:
            return True  # detached (CLI) lab: only `down` removes it
        return process_start_time(self.owner_pid) == self.owner_start

    def save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, lab_id: str) -> LabRecord:
        path = STATE_DIR / f"{lab_id}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LookupError(f"no lab {lab_id!r} (no {path})") from None
        return cls(**data)


def list_records() -> list[LabRecord]:
    records = []
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            records.append(LabRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("ignoring unreadable lab record %s: %s", path, exc)
    return records


def lab_id_of_namespace(netns: str) -> str | None:
    if not netns.startswith(NAMESPACE_PREFIX):
        return None
    rest = netns[len(NAMESPACE_PREFIX) :]
    lab_id, sep, _node = rest.partition("-")
    return lab_id if sep else None


def destroy(lab_id: str) -> list[str]:
    """Kill every process in lab ``lab_id``'s namespaces, delete them, forget the lab."""
    namespaces = list_namespaces(f"{NAMESPACE_PREFIX}{lab_id}-")
    delete_namespaces(namespaces)
    (STATE_DIR / f"{lab_id}.linkemu.log").unlink(missing_ok=True)
    (STATE_DIR / f"{lab_id}.json").unlink(missing_ok=True)
    return namespaces


def cleanup_stale(*, include_detached: bool = False) -> list[str]:
    """Remove labs whose owner process is gone, and lab namespaces with no record at all.

    ``include_detached`` also removes labs started by the CLI (``down --all``). Returns the ids
    of the labs removed.
    """
    records = {r.id: r for r in list_records()}
    ids = set(records)
    for netns in list_namespaces(NAMESPACE_PREFIX):
        lab_id = lab_id_of_namespace(netns)
        if lab_id is not None:
            ids.add(lab_id)
    removed = []
    for lab_id in sorted(ids):
        record = records.get(lab_id)
        if record is not None and record.owner_alive():
            if not (include_detached and record.owner_pid is None):
                continue
        gone = destroy(lab_id)
        logger.info("removed stale lab %s (%d namespaces)", lab_id, len(gone))
        removed.append(lab_id)
    return removed
