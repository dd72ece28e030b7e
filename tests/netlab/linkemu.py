"""Delay and jitter for lab links, held in userspace through NFQUEUE.

This kernel has no ``sch_netem``, so the lab marks packets that need delay (the mark carries the
delay and jitter in milliseconds, see :func:`tests.netlab.netem.delay_mark`) and an
``iptables ... -j NFQUEUE`` rule hands them to this process, which gives each packet its verdict
(ACCEPT) once its delay is over. The packet itself stays in the kernel: nothing is copied,
rewritten or re-sent, so NAT, conntrack and every protocol behave exactly as without delay.

One process serves a whole lab: it binds queue 0 in every namespace it is given (a netlink
socket belongs to the namespace where it was created, so each socket is created by a thread that
first entered that namespace). Run it with ``python -m tests.netlab.linkemu NETNS...``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import random
import signal
import socket
import struct
import sys

from tests.netlab.netem import MAX_DELAY_MS, MAX_JITTER_MS
from tests.netlab.netns import call_in

logger = logging.getLogger(__name__)

# linux/netfilter/nfnetlink.h, nfnetlink_queue.h, netfilter.h
NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NF_ACCEPT = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

QUEUE_NUM = 0
QUEUE_MAXLEN = 20_000  # packets held at once per namespace; beyond that the kernel drops


def delay_of_mark(mark: int, rng: random.Random) -> float:
    """One packet's delay in seconds: uniform in [delay - jitter, delay + jitter], never < 0."""
    delay_ms = (mark >> 16) & MAX_DELAY_MS
    jitter_ms = mark & MAX_JITTER_MS
    if jitter_ms:
        return max(0.0, delay_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000.0
    return delay_ms / 1000.0


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, flags: int, seq: int, queue_num: int, attrs: bytes) -> bytes:
    # nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id = queue number (big endian)
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue_num) + attrs
    header = struct.pack(
        "=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0
    )
    return header + body


def _parse_attrs(data: bytes, offset: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        attrs[kind & NLA_TYPE_MASK] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return attrs


def open_queue_socket(netns: str | None) -> socket.socket:
    """Netlink socket bound to queue 0, created inside ``netns`` (None: this namespace)."""
    family, kind = socket.AF_NETLINK, socket.SOCK_RAW
    if netns is None:
        sock = socket.socket(family, kind, NETLINK_NETFILTER)
    else:
        sock = call_in(netns, socket.socket, family, kind, NETLINK_NETFILTER)
    sock.bind((0, 0))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    config = [
        _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)),
        _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
        _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)),
    ]
    for seq, attr in enumerate(config, start=1):
        sock.send(_message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, QUEUE_NUM, attr))
        reply = sock.recv(65536)
        _length, msg_type = struct.unpack_from("=IH", reply, 0)
        if msg_type == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", reply, 16)
            if code != 0:
                sock.close()
                raise OSError(-code, f"NFQUEUE config in {netns}: {os.strerror(-code)}")
    sock.setblocking(False)
    return sock


class QueueDelayer:
    """Holds each queued packet of one namespace for the delay its mark asks, then accepts it."""

    def __init__(self, sock: socket.socket, name: str, rng: random.Random) -> None:
        self._sock = sock
        self._name = name
        self._rng = rng
        self._loop = asyncio.get_running_loop()
        self.held = 0
        self.passed = 0

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    logger.warning("%s: netlink receive buffer overrun", self._name)
                    continue
                raise
            self._on_data(data)

    def _on_data(self, data: bytes) -> None:
        offset = 0
        while offset + 16 <= len(data):
            length, msg_type = struct.unpack_from("=IH", data, offset)
            if length < 16:
                return
            if msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                attrs = _parse_attrs(data[offset : offset + length], 20)
                (packet_id,) = struct.unpack_from("!I", attrs[NFQA_PACKET_HDR], 0)
                mark = struct.unpack("!I", attrs[NFQA_MARK])[0] if NFQA_MARK in attrs else 0
                self.held += 1
                delay = delay_of_mark(mark, self._rng)
                self._loop.call_later(delay, self._accept, packet_id)
            offset += (length + 3) & ~3

    def _accept(self, packet_id: int) -> None:
        verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        try:
            self._sock.send(_message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, QUEUE_NUM, verdict))
            self.passed += 1
        except OSError as exc:
            logger.warning("%s: verdict for packet %d failed: %s", self._name, packet_id, exc)


async def serve(netns_names: list[str], ready_fd: int | None, seed: int | None) -> None:
    """Bind the queue in each namespace, signal readiness, and delay packets until SIGTERM."""
    rng = random.Random(seed)
    delayers = []
    for name in netns_names:
        sock = open_queue_socket(name)
        delayers.append(QueueDelayer(sock, name, rng))
    for delayer in delayers:
        delayer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    logger.info("delaying packets in %d namespaces", len(delayers))
    await stop.wait()
    for delayer in delayers:
        delayer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("netns", nargs="+", help="network namespace names (from ip netns)")
    parser.add_argument("--ready-fd", type=int, help="write 'ready' to this fd once bound")
    parser.add_argument("--seed", type=int, help="seed for jitter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="linkemu: %(message)s")
    asyncio.run(serve(args.netns, args.ready_fd, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
