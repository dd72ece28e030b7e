"""The DHT at scale: N real DHT nodes (the same protocol code) on one in-memory network.

    .venv/bin/python benchmarks/dht_sim.py [--nodes 100 1000 10000] [--rtt-ms 50]
        [--dead-timeout 1.0] [--lookups 500] [--records 100] [--paths 1] [--json]

Each N: nodes join through 3 random members (self-lookup), 100 signed records are put, then
nodes are killed without warning (0%, 10%, then 30% of all nodes) and, at each stage, random
alive nodes look up random alive peers (`find_peer`) and random keys (FIND_NODE, checked
against the true k closest alive), and read every record back. Printed per stage: lookup
success, hops per lookup beside log2 N (hops = requests in sequence until someone named the
target; 0 = it was in the asker's own table), lookup latency, requests per lookup, accuracy
of the k closest, and the share of records that survived (they were stored at the k closest
and are not re-replicated between stages).

The event loop runs on a virtual clock: a request costs `--rtt-ms` of simulated time (a dial
to a dead node `--dead-timeout`), and latency is exact whatever the CPU load; real time is
spent only on the protocol work itself, which is reported as CPU time (the machine is shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import statistics
import sys

# Run as a script, this directory heads sys.path and this file would shadow the package.
if pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    sys.path.pop(0)

from lattica_ray.dht.simulation import SimConfig, SimReport, percentile, run_simulation


def summary(report: SimReport) -> dict[str, object]:
    return {
        "nodes": report.config.nodes,
        "log2_n": round(math.log2(report.config.nodes), 2),
        "join_cpu_s": round(report.join_seconds_cpu, 1),
        "total_cpu_s": round(report.cpu_seconds, 1),
        "total_real_s": round(report.real_seconds, 1),
        "requests": report.requests,
        "table_size_median": statistics.median(report.table_sizes),
        "stages": [
            {
                "killed": phase.killed_fraction,
                "success": round(phase.success_rate, 4),
                "hops_mean": round(statistics.mean(phase.hops or [0]), 2),
                "hops_max": max(phase.hops or [0]),
                "latency_p50_ms": round(percentile(phase.latencies, 50) * 1000, 1),
                "latency_p95_ms": round(percentile(phase.latencies, 95) * 1000, 1),
                "requests_per_lookup": round(statistics.mean(phase.queries or [0]), 1),
                "k_closest_accuracy": round(statistics.mean(phase.closest_overlap or [0.0]), 4),
                "records_survived": round(phase.record_survival, 4),
            }
            for phase in report.phases
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--jitter-ms", type=float, default=10.0)
    parser.add_argument("--dead-timeout", type=float, default=1.0)
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--closest-lookups", type=int, default=100)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--paths", type=int, default=1, help="S/Kademlia disjoint paths")
    parser.add_argument("--alpha", type=int, default=10)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="also print one JSON line per N")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    for nodes in args.nodes:
        config = SimConfig(
            nodes=nodes,
            rtt=args.rtt_ms / 1000,
            jitter=args.jitter_ms / 1000,
            dead_peer_timeout=args.dead_timeout,
            lookups=args.lookups,
            closest_lookups=args.closest_lookups,
            records=args.records,
            disjoint_paths=args.paths,
            alpha=args.alpha,
            k=args.k,
            seed=args.seed,
        )
        report = run_simulation(config)
        print("\n".join(report.lines()), flush=True)
        if args.json:
            print(json.dumps({**summary(report), "config": dataclasses.asdict(config)}))


if __name__ == "__main__":
    main()
