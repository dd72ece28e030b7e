"""Global objects: the local store of a LatticaActor, and fetching from providers.

`lattica_ray.put` stores an object's bytes here under its content ID and announces it in the
DHT; `lattica_ray.get` on another cluster finds providers, fetches ranges from several at once
(large objects), verifies the content hash, caches the copy and becomes a provider too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lattica_ray.ray.errors import ObjectCorrupt, ObjectNotFound
from lattica_ray.ray.mesh import Mesh
from lattica_ray.ray.protocol import OBJECT_READ, GlobalRef, content_id, split_ranges

__all__ = ["FetchStats", "GlobalRef", "ObjectStore", "fetch_object"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes received, total)


class ObjectStore:
    """Object bytes by content ID. Own objects are pinned; fetched copies are a cache, evicted
    least recently used first when they exceed `cache_bytes`."""

    def __init__(self, cache_bytes: int) -> None:
        self.cache_bytes = cache_bytes
        self._objects: OrderedDict[str, bytes] = OrderedDict()
        self._pinned: set[str] = set()
        self._cached_bytes = 0

    def __contains__(self, cid: str) -> bool:
        return cid in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def add(self, cid: str, data: bytes, *, pinned: bool) -> list[str]:
        """Store verified `data` under `cid`; return the cached CIDs evicted to make room."""
        if cid in self._objects:
            if pinned and cid not in self._pinned:
                self._pinned.add(cid)
                self._cached_bytes -= len(self._objects[cid])
            self._objects.move_to_end(cid)
            return []
        self._objects[cid] = data
        if pinned:
            self._pinned.add(cid)
            return []
        self._cached_bytes += len(data)
        return self._evict(keep=cid)

    def _evict(self, keep: str) -> list[str]:
        evicted = []
        for cid in list(self._objects):
            if self._cached_bytes <= self.cache_bytes:
                break
            if cid in self._pinned or cid == keep:
                continue
            self._cached_bytes -= len(self._objects.pop(cid))
            evicted.append(cid)
        return evicted

    def get(self, cid: str) -> bytes | None:
        data = self._objects.get(cid)
        if data is not None:
            self._objects.move_to_end(cid)
        return data

    def read(self, cid: str, offset: int, length: int, max_length: int) -> bytes:
        """A byte range, for a peer fetching the object; bad ranges get a clear error."""
        data = self._objects.get(cid)
        if data is None:
            raise ObjectNotFound(f"object {cid} is not held here")
        if length > max_length:
            raise ValueError(f"range of {length} bytes exceeds the limit of {max_length}")
        if offset < 0 or length < 0 or offset + length > len(data):
            raise ValueError(f"range {offset}+{length} is outside the object ({len(data)} bytes)")
        return data[offset : offset + length]

    def remove(self, cid: str) -> None:
        data = self._objects.pop(cid, None)
        if data is not None and cid not in self._pinned:
            self._cached_bytes -= len(data)
        self._pinned.discard(cid)


@dataclass
class FetchStats:
    """What a fetch did: who sent how much, and how long it took."""

    size: int
    seconds: float = 0.0
    bytes_by_provider: dict[str, int] | None = None
    failed_providers: dict[str, str] | None = None


async def fetch_object(
    ref: GlobalRef,
    mesh: Mesh,
    *,
    chunk_bytes: int,
    parallel: int,
    timeout: float | None = None,
    progress: Progress | None = None,
) -> tuple[bytes, FetchStats]:
    """The verified bytes of `ref`, fetched from its providers.

    Ranges of `chunk_bytes` are handed out to up to `parallel` providers at once; a provider
    that fails is dropped and its range handed to the others. Raises `ObjectNotFound` when
    no provider can serve it, `ObjectCorrupt` when the bytes do not match the content ID.
    """
    started = time.monotonic()
    providers = await _providers(ref, mesh)
    ranges = split_ranges(ref.size, chunk_bytes)
    pending: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for item in ranges:
        pending.put_nowait(item)
    buffer = bytearray(ref.size)
    sent: dict[str, int] = {}
    failed: dict[str, str] = {}
    received = 0
    remaining = len(ranges)
    done = asyncio.Event()
    if remaining == 0:
        done.set()

    async def worker(peer: str) -> None:
        nonlocal received, remaining
        while not done.is_set():
            try:
                offset, length = pending.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                part = await mesh.call(peer, OBJECT_READ, ref.cid, offset, length, timeout=timeout)
                if not isinstance(part, bytes | bytearray | memoryview) or len(part) != length:
                    raise ValueError(f"sent a malformed range {offset}+{length}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed[peer] = f"{type(exc).__name__}: {exc}"
                logger.info("provider %s failed for %s: %s", peer, ref.cid, failed[peer])
                pending.put_nowait((offset, length))
                return
            buffer[offset : offset + length] = part
            sent[peer] = sent.get(peer, 0) + length
            received += length
            remaining -= 1
            if progress is not None:
                progress(received, ref.size)
            if remaining == 0:
                done.set()

    # Hand providers out in rounds of `parallel` until every range is in or none is left.
    queue = list(providers)
    while not done.is_set() and queue:
        batch, queue = queue[:parallel], queue[parallel:]
        await asyncio.gather(*(worker(p) for p in batch))
        if not done.is_set():
            queue = [p for p in batch if p not in failed] + queue
            if all(p in failed for p in batch) and not queue:
                break
    if not done.is_set():
        raise ObjectNotFound(
            f"object {ref.cid} could not be fetched: "
            + ("; ".join(f"{p}: {e}" for p, e in failed.items()) or "no providers"),
            cid=ref.cid,
        )
    data = bytes(buffer)
    actual = await asyncio.to_thread(content_id, data)
    if actual != ref.cid:
        raise ObjectCorrupt(
            f"object {ref.cid} arrived with content ID {actual} (from {sorted(sent)}); "
            "the bytes were discarded",
            cid=ref.cid,
            providers=sorted(sent),
        )
    stats = FetchStats(ref.size, time.monotonic() - started, sent, failed)
    return data, stats


async def _providers(ref: GlobalRef, mesh: Mesh) -> list[str]:
    """Hinted providers first, then the DHT's; never ourselves."""
    found: list[str] = []
    try:
        found = await mesh.find_providers(ref.cid)
    except Exception as exc:
        if not ref.providers:
            raise ObjectNotFound(f"no provider of {ref.cid} found: {exc}", cid=ref.cid) from exc
        logger.info("provider lookup for %s failed (%s); using the hints", ref.cid, exc)
    ordered = [p for p in dict.fromkeys([*ref.providers, *found]) if p != mesh.peer_id]
    if not ordered:
        raise ObjectNotFound(f"no provider of {ref.cid} is known", cid=ref.cid)
    return ordered
