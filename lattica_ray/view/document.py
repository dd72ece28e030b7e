"""The pycrdt document behind the view, its layout, and the write rules checked on every update.

Layout: three root maps of JSON strings, every key starting with its author's peer ID:

    members  "<peer>/<incarnation>"                   -> MemberRecord
    actors   "<peer>/<incarnation>/<actor name>"      -> ActorRecord
    user     "<peer>/<incarnation>/<json [map, key]>" -> UserRecord

Because no two authors (or two runs of one author) ever share a key, concurrent writes never
conflict inside Yjs, and an honest update only creates items of its own chain's client ID, under
its own keys, builds only on its own chain's items, and deletes only those. (A run never edits an
earlier run's items: it copies what it keeps and retires the earlier run, see protocol.py.) A
received update is checked twice:

1. structurally, by decoding it (`yupdate`): item clients and clocks, origins, parents, map keys,
   content kinds and the delete set;
2. by effect, on a copy (the probe document): apply it there, see which keys changed and that
   pycrdt integrated exactly the update (it holds back, silently and reporting success, whatever
   builds on items it lacks: `MissingDependency`); only then apply it to the real document.

A rejected update leaves the probe dirty; it is rebuilt from the real document.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pycrdt import Doc, Map, MapEvent

from lattica_ray.view.envelope import peer_name
from lattica_ray.view.errors import MissingDependency, WriteRuleViolation
from lattica_ray.view.yupdate import (
    CONTENT_ANY,
    CONTENT_DELETED,
    DecodedUpdate,
    decode_update,
)
from transport.identity import PeerId

log = logging.getLogger(__name__)

MEMBERS = "members"
ACTORS = "actors"
USER = "user"
ROOTS = (MEMBERS, ACTORS, USER)
ALLOWED_CONTENT = {CONTENT_ANY, CONTENT_DELETED}


@dataclass(frozen=True)
class EntryChange:
    """One root-map key that an update added, changed or removed."""

    root: str
    key: str
    value: str | None  # the new JSON string, None when removed


def author_prefix(author: PeerId) -> str:
    return f"{peer_name(author)}/"


def chain_prefix(author: PeerId, incarnation: int) -> str:
    return f"{peer_name(author)}/{incarnation}"


class ViewDocument:
    """The real document and its probe copy; the only module that touches pycrdt."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self._main = Doc(client_id=client_id)
        self._main_roots = {name: self._main.get(name, type=Map) for name in ROOTS}
        self._changes: list[EntryChange] = []
        for name, root in self._main_roots.items():
            root.observe(self._recorder(name, self._changes))
        self._integrated: list[bytes] = []  # what each transaction on the real document did
        self._main.observe(lambda event: self._integrated.append(event.update))
        self._probe_integrated: list[bytes] = []
        self._probe_changes: list[EntryChange] = []
        self._new_probe()
        self.state: dict[int, int] = {}  # client -> next clock, kept in step with both documents

    # -- local writes ----------------------------------------------------------------------------
    def write(
        self, changes: Iterable[tuple[str, str, str | None]]
    ) -> tuple[bytes, list[EntryChange]]:
        """Apply our own changes (root, key, JSON or None to remove) in one transaction.

        Returns the Yjs update of just this transaction (never a diff against a state vector:
        that would carry the whole delete set, other authors' deletions included) and the changes.
        """
        self._changes.clear()
        self._integrated.clear()
        with self._main.transaction():
            for root, key, value in changes:
                target = self._main_roots[root]
                if value is None:
                    if key in target:
                        del target[key]
                else:
                    target[key] = value
        if not self._integrated:
            return b"", []
        update = self._integrated[0]
        self._probe.apply_update(update)
        self._probe_changes.clear()
        self._probe_integrated.clear()
        self._advance(decode_update(update))
        changes_made = list(self._changes)
        self._changes.clear()
        return update, changes_made

    # -- remote updates --------------------------------------------------------------------------
    def check(
        self,
        update: bytes,
        author: PeerId,
        incarnation: int,
        client_id: int,
        owner_of: Callable[[int], PeerId | None],
    ) -> DecodedUpdate:
        """Structural write-rule check; raises `WriteRuleViolation`. `owner_of` only names the
        author of a foreign client ID in the error message."""
        decoded = decode_update(update)
        own_start = self.state.get(client_id, 0)
        own_end = own_start
        for struct in decoded.structs:
            if struct.client != client_id:
                raise WriteRuleViolation(
                    f"update creates items for Yjs client {struct.client}; its author may only "
                    f"use {client_id} (derived from its peer ID and incarnation)"
                )
            if struct.clock != own_end:
                raise WriteRuleViolation(
                    f"update's items start at clock {struct.clock}, expected {own_end}: the author "
                    "skipped or reused clocks"
                )
            own_end = struct.end
            if struct.content not in ALLOWED_CONTENT:
                raise WriteRuleViolation(
                    f"content kind {struct.content} is not allowed in the view (only values)"
                )
        own_key = chain_prefix(author, incarnation)
        for struct in decoded.structs:
            for ref in (struct.origin, struct.right_origin):
                if ref is not None:
                    self._check_reference(
                        ref.client, ref.clock + 1, author, client_id, own_end, owner_of
                    )
            if struct.origin is None and struct.right_origin is None:
                if struct.parent_id is not None or struct.parent_name not in ROOTS:
                    raise WriteRuleViolation(
                        "update writes into a nested or unknown type; the view has only the root "
                        f"maps {ROOTS}"
                    )
                key = struct.parent_sub
                if key is None or not _key_in_chain(struct.parent_name, key, own_key):
                    raise WriteRuleViolation(
                        f"{author.short()} may not create key {key!r} in {struct.parent_name!r}: "
                        f"authors write only keys starting with {own_key!r}"
                    )
        for client, ranges in decoded.delete_set.items():
            for clock, length in ranges:
                self._check_reference(client, clock + length, author, client_id, own_end, owner_of)
        return decoded

    def _check_reference(
        self,
        client: int,
        end: int,
        author: PeerId,
        client_id: int,
        own_end: int,
        owner_of: Callable[[int], PeerId | None],
    ) -> None:
        """Items up to clock `end` of `client` must be this chain's own, and exist."""
        if client == client_id:
            if end > own_end:
                raise WriteRuleViolation("update refers to its own items that do not exist")
            return
        owner = owner_of(client)
        if owner == author:
            whose = "its author's earlier run (earlier runs are retired, never edited)"
        elif owner is not None:
            whose = f"{owner.short()}"
        else:
            whose = "an unknown author"
        raise WriteRuleViolation(
            f"{author.short()} refers to or deletes items of {whose}; an update may only touch "
            "items of its own chain"
        )

    def apply(self, update: bytes, decoded: DecodedUpdate, author: PeerId) -> list[EntryChange]:
        """Apply a `check`ed update: to the probe, inspect the effect, then to the real document."""
        expected = decoded.clock_ranges()
        self._probe_changes.clear()
        self._probe_integrated.clear()
        self._probe.apply_update(update)
        try:
            self._inspect_effect(expected, author)
        except (WriteRuleViolation, MissingDependency):
            self._new_probe()
            raise
        self._changes.clear()
        self._integrated.clear()
        self._main.apply_update(update)
        integrated = _integrated_ranges(self._integrated)
        if integrated != expected:  # the probe agreed, so this is a pycrdt surprise: say so
            log.error("view document integrated %s, expected %s", integrated, expected)
        for client, (_, end) in integrated.items():
            self.state[client] = max(self.state.get(client, 0), end)
        changes = list(self._changes)
        self._changes.clear()
        return changes

    def _inspect_effect(self, expected: dict[int, tuple[int, int]], author: PeerId) -> None:
        """What applying the update did to the probe: only the author's keys, all of it."""
        prefix = author_prefix(author)
        for change in self._probe_changes:
            if not change.key.startswith(prefix):
                raise WriteRuleViolation(
                    f"on a copy, the update changed {change.root}[{change.key!r}], which "
                    f"{author.short()} does not own"
                )
        integrated = _integrated_ranges(self._probe_integrated)
        if integrated != expected:
            raise MissingDependency(
                f"on a copy, pycrdt integrated {integrated} of the update's {expected}: it holds "
                "the rest back silently until predecessors arrive"
            )

    # -- reading -----------------------------------------------------------------------------------
    def entries(self, root: str) -> dict[str, str]:
        """Every key of a root map, read from the document itself (not from any cache)."""
        return {
            key: value for key, value in self._main_roots[root].items() if isinstance(value, str)
        }

    def encoded_size(self) -> int:
        """Bytes of the whole document as one update: what a fresh replica would have to hold."""
        return len(self._main.get_update())

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _recorder(root: str, sink: list[EntryChange]) -> Callable[[MapEvent], None]:
        def record(event: MapEvent) -> None:
            for key, change in event.keys.items():
                value = change.get("newValue") if change["action"] != "delete" else None
                sink.append(EntryChange(root, key, value if isinstance(value, str) else None))

        return record

    def _new_probe(self) -> None:
        self._probe = Doc()
        # Keep the root objects: pycrdt drops a Map's observers when its Python object goes.
        self._probe_roots = {name: self._probe.get(name, type=Map) for name in ROOTS}
        for name, root in self._probe_roots.items():
            root.observe(self._recorder(name, self._probe_changes))
        self._probe.observe(lambda event: self._probe_integrated.append(event.update))
        self._probe.apply_update(self._main.get_update())
        self._probe_changes.clear()
        self._probe_integrated.clear()

    def _advance(self, decoded: DecodedUpdate) -> None:
        for client, (_, end) in decoded.clock_ranges().items():
            self.state[client] = max(self.state.get(client, 0), end)


def _integrated_ranges(updates: list[bytes]) -> dict[int, tuple[int, int]]:
    """Clock ranges per client of what transactions integrated (their own encoded updates)."""
    ranges: dict[int, tuple[int, int]] = {}
    for update in updates:
        for client, (start, end) in decode_update(update).clock_ranges().items():
            old = ranges.get(client)
            ranges[client] = (start, end) if old is None else (min(old[0], start), max(old[1], end))
    return ranges


def _key_in_chain(root: str, key: str, own_key: str) -> bool:
    if root == MEMBERS:
        return key == own_key
    return key.startswith(own_key + "/")
