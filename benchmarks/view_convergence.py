"""Convergence of the cluster view: N in-process replicas on an in-memory network.

For each N: start N views (each joins one random earlier view), then every view makes random
concurrent writes (its resources, an exported actor, a user-map key) inside a short window, and we
measure the time until every replica holds the same set of updates, and the bytes sent per update.
The baseline beside it is what a lone author would send to reach everyone directly, once each:
(N - 1) x the envelope size. Then heartbeat rounds: the time for every heartbeat to reach every
replica, the bytes per node per round, and the document size before and after many rounds (it
must not grow: heartbeats live outside the CRDT).

The view clock follows real time plus an offset that the benchmark jumps to trigger heartbeat
rounds; heartbeats are otherwise slow so that they do not mix into the update figures.

    .venv/bin/python benchmarks/view_convergence.py                  # N = 10 20 50 100 200
    .venv/bin/python benchmarks/view_convergence.py --sizes 20 50 --updates-per-node 2 --json
    .venv/bin/python benchmarks/view_convergence.py --long-run 2000   # steady writes: flat state
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

# The repository root first: run as a script, benchmarks/ would be on the path, and its
# transport.py would hide the transport package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lattica_ray.view import ClusterView, ViewConfig
from transport.memory_host import MemoryNetwork

CONFIG = ViewConfig(
    heartbeat_interval=60.0,  # rounds are triggered by jumping the clock
    suspect_after=600.0,
    gone_after=1800.0,
    anti_entropy_interval=2.0,
    gap_grace=1.0,
    tick_interval=0.1,
    gossip_batch_delay=0.01,
    request_timeout=30.0,
)


class JumpClock:
    """Real time plus an offset the benchmark can jump."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def bytes_sent(views: list[ClusterView]) -> dict[str, int]:
    total = {"gossip": 0, "sync": 0}
    for view in views:
        for kind in total:
            total[kind] += view.stats[f"bytes_sent_{kind}"]
    return total


async def wait_for(predicate, timeout: float, poll: float = 0.01) -> float:
    """Seconds until `predicate()` holds, polled every `poll` s (checking on every change of
    every view would cost more than the protocol itself at N = 200)."""
    start = time.perf_counter()
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (a poll on purpose, see above)
            await asyncio.sleep(poll)
    return time.perf_counter() - start


def picture(view: ClusterView) -> tuple[object, ...]:
    """What a reader sees, liveness aside (that is each replica's own observation)."""
    liveness = {"status": None, "last_heartbeat": None}
    members = [m.model_copy(update=liveness) for m in view.members()]
    return members, view.actors(include_hidden=True), view.map("run").entries()


def same_updates(views: list[ClusterView]) -> bool:
    return len({v.digest() for v in views}) == 1


async def run_size(n: int, updates_per_node: int, rounds: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    network = MemoryNetwork(rtt=0.001, jitter=0.0005, seed=seed)
    clock = JumpClock()
    views: list[ClusterView] = []
    try:
        t0 = time.perf_counter()
        for index in range(n):
            host = network.add_host()
            view = ClusterView(
                host, host.key, CONFIG, cluster_name=f"c{index % 3}", clock=clock, seed=index
            )
            views.append(view)
            await view.start()
            if index:
                await view.join([rng.choice(views[:-1]).peer_id])
        await wait_for(lambda: same_updates(views) and len(views[0].members()) == n, 300)
        setup = time.perf_counter() - t0

        # -- random concurrent updates -------------------------------------------------------
        before = bytes_sent(views)
        total_updates = n * updates_per_node
        window = 0.2

        async def writer(view: ClusterView, index: int) -> None:
            for k in range(updates_per_node):
                await asyncio.sleep(rng.uniform(0, window))
                choice = rng.randrange(3)
                if choice == 0:
                    view.set_resources({"cpus": rng.randrange(1, 64), "gpus": rng.randrange(8)})
                elif choice == 1:
                    view.export_actor(f"actor-{index}-{k}", "Worker", {"step": "async"})
                else:
                    view.map("run").set(f"k{rng.randrange(10)}", rng.randrange(1000))

        start, cpu_start = time.perf_counter(), time.process_time()
        await asyncio.gather(*(writer(v, i) for i, v in enumerate(views)))
        issued = time.perf_counter()
        total = sum(v._replica.heads()[v._replica.chain_id.client_id] for v in views)

        def reach() -> float:
            """Share of (replica, update) pairs delivered so far."""
            return sum(sum(v._replica.heads().values()) for v in views) / (n * total)

        to_99 = await wait_for(lambda: reach() >= 0.99, 300, poll=0.02)
        await wait_for(lambda: same_updates(views), 300)
        done, cpu_done = time.perf_counter(), time.process_time()
        after = bytes_sent(views)
        update_bytes = {k: after[k] - before[k] for k in after}
        envelope_sizes = [
            len(u.encode()) for u in views[0]._replica.updates_missing_from({})[-total_updates:]
        ]
        mean_envelope = statistics.mean(envelope_sizes)
        # the same picture on every replica, not only the same set of updates
        reference = picture(views[0])
        assert all(picture(view) == reference for view in views[1:])

        # -- heartbeat rounds ----------------------------------------------------------------
        doc_before = views[0].document_size()
        hb_before = bytes_sent(views)
        hb_times, hb_coverage = [], []
        pairs = n * (n - 1)
        for _ in range(rounds):
            clock.offset += CONFIG.heartbeat_interval
            targets = {v.peer_id: v._replica._heartbeat_counter + 1 for v in views}
            for view in views:
                view.tick()

            def coverage(targets=targets) -> float:
                heard = 0
                for view in views:
                    for author, counter in targets.items():
                        state = view._replica._authors.get(author)
                        if author != view.peer_id and state is not None and state.heartbeat:
                            heard += state.heartbeat.counter >= counter
                return heard / pairs

            try:
                hb_times.append(await wait_for(lambda: coverage() >= 0.95, 30))
            except TimeoutError:
                hb_times.append(float("inf"))
            await asyncio.sleep(2.0)  # let the last forwards land before counting
            hb_coverage.append(coverage())
        hb_after = bytes_sent(views)
        doc_after = views[0].document_size()
        hb_bytes = sum(hb_after.values()) - sum(hb_before.values())
        counters: Counter[str] = Counter()
        for view in views:
            counters.update(view.stats)
            counters.update(view._replica.stats)
        return {
            "n": n,
            "counters": {k: counters[k] for k in sorted(counters) if not k.startswith("bytes")},
            "updates": total_updates,
            "setup_s": round(setup, 2),
            "converge_from_first_s": round(done - start, 3),
            "converge_after_last_s": round(done - issued, 3),
            "reach_99pct_after_last_s": round(to_99, 3),
            "cpu_s_all_replicas": round(cpu_done - cpu_start, 2),
            "bytes_per_update": round(sum(update_bytes.values()) / total_updates),
            "gossip_bytes_per_update": round(update_bytes["gossip"] / total_updates),
            "sync_bytes_per_update": round(update_bytes["sync"] / total_updates),
            "baseline_direct_bytes_per_update": round((n - 1) * mean_envelope),
            "bytes_per_update_per_node": round(sum(update_bytes.values()) / total_updates / n),
            "heartbeat_95pct_s": round(statistics.median(hb_times), 3),
            "heartbeat_coverage": round(min(hb_coverage), 4),
            "heartbeat_bytes_per_node_per_round": round(hb_bytes / rounds / n),
            "document_bytes_before_heartbeats": doc_before,
            "document_bytes_after_heartbeats": doc_after,
        }
    finally:
        for view in views:
            await view.stop()
        for host in list(network.hosts.values()):
            await host.aclose()


async def long_run(n: int, writes_per_node: int, seed: int) -> list[dict[str, object]]:
    """Steady writes for a long time: what one replica holds (document bytes, updates kept),
    sampled as the writes go on. Compaction (`compact_after_updates`) keeps both flat."""
    rng = random.Random(seed)
    network = MemoryNetwork(seed=seed)
    config = CONFIG.model_copy(update={"compact_after_updates": 200})
    views: list[ClusterView] = []
    samples = []
    try:
        for index in range(n):
            host = network.add_host()
            view = ClusterView(host, host.key, config, clock=time.time, seed=index)
            views.append(view)
            await view.start()
            if index:
                await view.join([views[0].peer_id])
        await wait_for(lambda: same_updates(views) and len(views[0].members()) == n, 120)
        step = max(1, writes_per_node // 8)
        for done in range(0, writes_per_node + 1, step):
            if done:
                for _ in range(step):
                    for view in views:
                        view.map("run").set(f"k{rng.randrange(20)}", rng.randrange(10**6))
                    await asyncio.sleep(0)  # let gossip and compaction run between writes
                for view in views:
                    view.tick()
            await wait_for(lambda: same_updates(views), 120)
            observer = views[-1]
            samples.append(
                {
                    "writes": done * n,
                    "document_bytes": observer.document_size(),
                    "updates_kept": len(observer._replica.updates_missing_from({})),
                    "compactions": sum(v._replica.stats["compactions"] for v in views),
                }
            )
        return samples
    finally:
        for view in views:
            await view.stop()
        for host in list(network.hosts.values()):
            await host.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    parser.add_argument("--updates-per-node", type=int, default=1)
    parser.add_argument("--heartbeat-rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON line per size")
    parser.add_argument(
        "--long-run",
        type=int,
        metavar="WRITES",
        help="instead: 10 nodes each writing WRITES user-map values; print what a replica holds",
    )
    args = parser.parse_args()
    if args.long_run:
        print(f"{'writes':>8} {'document B':>10} {'updates kept':>12} {'compactions':>11}")
        for row in await long_run(10, args.long_run, args.seed):
            print(
                f"{row['writes']:>8} {row['document_bytes']:>10} {row['updates_kept']:>12} "
                f"{row['compactions']:>11}"
            )
        return
    columns = [  # (heading, result key, width)
        ("N", "n", 4),
        ("updates", "updates", 7),
        ("conv(s)", "converge_from_first_s", 8),
        ("after last", "converge_after_last_s", 10),
        ("99% after", "reach_99pct_after_last_s", 9),
        ("cpu(s)", "cpu_s_all_replicas", 7),
        ("B/update", "bytes_per_update", 9),
        ("baseline", "baseline_direct_bytes_per_update", 9),
        ("B/upd/node", "bytes_per_update_per_node", 10),
        ("hb 95%(s)", "heartbeat_95pct_s", 9),
        ("hb reach", "heartbeat_coverage", 8),
        ("hb B/node", "heartbeat_bytes_per_node_per_round", 9),
        ("doc B before", "document_bytes_before_heartbeats", 12),
        ("doc B after", "document_bytes_after_heartbeats", 11),
    ]
    if not args.json:
        print(" ".join(f"{heading:>{width}}" for heading, _, width in columns))
    for n in args.sizes:
        r = await run_size(n, args.updates_per_node, args.heartbeat_rounds, args.seed)
        if args.json:
            print(json.dumps(r))
        else:
            print(" ".join(f"{r[key]!s:>{width}}" for _, key, width in columns))
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
