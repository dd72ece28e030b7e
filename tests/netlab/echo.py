"""A tiny STUN stand-in for the lab: answer each UDP datagram with the address it came from.

``python -m tests.netlab.echo --port 3478`` prints ``ready <port>`` once bound, then replies
``<ip>:<port>`` (ASCII) to every datagram, from the port it was sent to. Run it on a public
host (``lab.spawn("relay1", [...])``) to see the mapping a NAT gave a host behind it.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys


def observed(addr: tuple[str, int]) -> bytes:
    """The reply payload for a datagram from ``addr``."""
    return f"{addr[0]}:{addr[1]}".encode()


def parse_observed(payload: bytes) -> tuple[str, int]:
    """Inverse of :func:`observed`; raises ValueError on anything else."""
    host, sep, port = payload.decode("ascii").rpartition(":")
    if not sep or not host:
        raise ValueError(f"not an observed address: {payload!r}")
    return host, int(port)


def serve(sock: socket.socket) -> None:
    """Reply to every datagram on ``sock`` until it is closed."""
    while True:
        try:
            _data, addr = sock.recvfrom(2048)
        except OSError:
            return
        sock.sendto(observed(addr), addr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3478)
    parser.add_argument("--bind", default="0.0.0.0")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, args.port))
    print(f"ready {sock.getsockname()[1]}", flush=True)
    serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
