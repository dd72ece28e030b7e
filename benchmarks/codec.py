"""The Arrow codec against a plain memory copy and pickle protocol 5 (out-of-band buffers).

    python benchmarks/codec.py [--size-mib 64] [--repeats 20] [--json]

For a 64 MiB float32 array: encode (to the list of buffers the RPC writes) and decode (from a
receive buffer, validation included), beside copying the same bytes once (memcpy, the cost of
any codec that copies) and pickle protocol 5 with out-of-band buffers (zero-copy, but unsafe
on data from the network). Also a small control message and a 300-tensor state dict, where the
fixed per-message and per-tensor costs show. Ratios above 1 mean the codec is faster. The
machine is shared and noisy: figures are medians of several runs; read the ratios.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import pickle
import statistics
import sys
import time
from collections.abc import Callable

# Run as a script, this directory heads sys.path and this file would shadow the package.
if pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np

from lattica_ray.rpc.codec import decode, encode


def timed(action: Callable[[], object], repeats: int, inner: int = 1) -> float:
    """Median seconds of one call of `action` over `repeats` runs of `inner` calls each."""
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(inner):
            action()
        samples.append((time.perf_counter() - began) / inner)
    return statistics.median(samples)


def pickle5_pair(value: object) -> tuple[Callable[[], object], Callable[[], object]]:
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    received = [bytearray(buffer.raw()) for buffer in buffers]  # as a receiver would hold them

    def dumps() -> object:
        out: list[pickle.PickleBuffer] = []
        return pickle.dumps(value, protocol=5, buffer_callback=out.append), out

    def loads() -> object:
        return pickle.loads(payload, buffers=received)

    return dumps, loads


def codec_pair(value: object) -> tuple[Callable[[], object], Callable[[], object], int]:
    message = bytearray(b"".join(encode(value)))  # a receive buffer (malloc'd, aligned)
    return (lambda: encode(value)), (lambda: decode(message)), len(message)


def measure(name: str, value: object, repeats: int, inner: int, nbytes: int) -> dict[str, object]:
    encode_codec, decode_codec, message_size = codec_pair(value)
    dumps, loads = pickle5_pair(value)
    row: dict[str, object] = {"case": name, "payload_bytes": nbytes, "message_bytes": message_size}
    row["codec_encode_s"] = timed(encode_codec, repeats, inner)
    row["codec_decode_s"] = timed(decode_codec, repeats, inner)
    row["pickle5_dumps_s"] = timed(dumps, repeats, inner)
    row["pickle5_loads_s"] = timed(loads, repeats, inner)
    if nbytes >= 1 << 20:
        source = np.frombuffer(b"".join(encode(value)), np.uint8)
        target = np.empty_like(source)
        row["memcpy_s"] = timed(lambda: np.copyto(target, source), repeats)
    return row


def report(rows: list[dict[str, object]]) -> None:
    def us(seconds: object) -> str:
        return f"{float(seconds) * 1e6:10.1f} us"

    for row in rows:
        sizes = f"payload {row['payload_bytes']:,} B, message {row['message_bytes']:,} B"
        print(f"\n{row['case']}: {sizes}")
        for side, ours, theirs in (
            ("encode", "codec_encode_s", "pickle5_dumps_s"),
            ("decode", "codec_decode_s", "pickle5_loads_s"),
        ):
            line = f"  {side}: codec {us(row[ours])} | pickle5 oob {us(row[theirs])} "
            line += f"(x{float(row[theirs]) / float(row[ours]):.3g})"
            if "memcpy_s" in row:
                gbps = float(row["payload_bytes"]) / float(row[ours]) / 1e9
                ratio = float(row["memcpy_s"]) / float(row[ours])
                line += f" | memcpy {us(row['memcpy_s'])} (x{ratio:.3g})"
                line += f" | {gbps:,.1f} GB/s"
            print(line)
    print("\n(x = baseline time / codec time: above 1 the codec is faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    big = np.random.default_rng(0).random(args.size_mib << 18, dtype=np.float32)
    small = {"method": "act", "step": 1234, "obs": np.zeros(16, np.float32), "tag": b"x" * 20}
    state = {f"layer{i}.weight": np.ones((64, 64), np.float32) for i in range(300)}
    rows = [
        measure(f"{args.size_mib} MiB float32 array", big, args.repeats, 1, big.nbytes),
        measure("small control message", small, args.repeats, 200, 100),
        measure("state dict, 300 x 16 KiB", state, max(args.repeats // 4, 3), 1, 300 * 64 * 64 * 4),
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        report(rows)


if __name__ == "__main__":
    main()
