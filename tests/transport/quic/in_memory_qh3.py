"""Two qh3 engines (transport.quic.engine_qh3) handing datagrams to each other in memory: the
sans-I/O harness of the qh3 TLS tests (no sockets, no clock)."""

from __future__ import annotations

from collections.abc import Callable

from transport.identity import KeyPair
from transport.quic.endpoint import CONNECTION_ID_LENGTH, SUPPORTED_VERSIONS
from transport.quic.engine_qh3 import Qh3Engine, qh3_configuration
from transport.tls import ALPN, make_certificate

SERVER = ("127.0.0.1", 4001)
CLIENT = ("127.0.0.1", 4002)


def qh3_engine(
    key: KeyPair, original_cid: bytes | None = None, certificate=None, **overrides
) -> Qh3Engine:
    """A client engine, or (with `original_cid`) a server's; `certificate` is a
    (certificate, private key) pair other than `key`'s own, `overrides` qh3 settings."""
    certificate, private_key = certificate or make_certificate(key)
    configuration = qh3_configuration(
        is_client=original_cid is None,
        certificate=certificate,
        private_key=private_key,
        alpn=ALPN,
        idle_timeout=5.0,
        max_datagram_size=1350,
        probe_datagram_size=False,
        max_data=1 << 20,
        max_stream_data=1 << 20,
        connection_id_length=CONNECTION_ID_LENGTH,
        supported_versions=list(SUPPORTED_VERSIONS),
    )
    for name, value in overrides.items():
        setattr(configuration, name, value)
    return Qh3Engine(configuration, original_destination_connection_id=original_cid)


def handshake(
    client: Qh3Engine, server: Qh3Engine, after_connect: Callable[[], None] | None = None
) -> tuple[list[str], list[str]]:
    """Run the handshake in memory; the event class names each side saw. `after_connect`
    runs once the client has started (to tamper with what it sends)."""
    now = 0.0
    client.connect(SERVER, now)
    if after_connect is not None:
        after_connect()
    seen: tuple[list[str], list[str]] = ([], [])
    for _ in range(12):
        for sender, receiver, source in ((client, server, CLIENT), (server, client, SERVER)):
            for data, _ in sender.datagrams_to_send(now):
                receiver.receive_datagram(data, source, now)
        for engine, names in ((client, seen[0]), (server, seen[1])):
            while (event := engine.next_event()) is not None:
                names.append(type(event).__name__)
        now += 0.001
    return seen
