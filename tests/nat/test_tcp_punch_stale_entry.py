"""A TCP hole punch through a NAT that still tracks an earlier, unanswered SYN on the same port
pair: the side behind that NAT dials first, so its new SYN re-arms the entry before the peer's
SYN arrives (otherwise the NAT lets the peer's SYN in as a simultaneous open, our listener
answers with a new sequence number, and the NAT drops that SYN-ACK as out of window). "First"
means its SYN has left before the peer is told to dial: the peer's SYN comes back within a
millisecond here."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.nat.mesh_lab import start_peers, start_relays
from tests.netlab import Lab, NatKind

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.timeout(180)
def test_punch_through_a_nat_holding_a_stale_half_open_entry(netlab: Callable[..., Lab]) -> None:
    lab = netlab()
    for name in ("relay1", "relay2"):
        lab.add_public_host(name)
    lab.add_nat("rport", NatKind.PORT_RESTRICTED)
    lab.add_host("hport", behind="rport")
    lab.add_nat("rblk", NatKind.UDP_BLOCKED)
    lab.add_host("hblk", behind="rblk")
    lab.start()
    relays = start_relays(lab)
    behind_nat = start_peers(lab, ["hport"], relays)["hport"]
    blocked_tcp = f"/ip4/{lab.address('hblk')}/tcp/4001"

    # The NAT'd side dials the firewalled host's TCP port from its listen port: the SYN dies at
    # the firewall, and the NAT keeps the port pair half-open (SYN_SENT) for two minutes.
    dialed = behind_nat.command(timeout=60, cmd="dial_from_listen_port", addr=blocked_tcp)
    assert not dialed["connected"], dialed
    stale = [e for e in lab.mappings("rport") if "SYN_SENT" in e and "dport=4001" in e]
    assert any(f"dst={lab.address('hblk')}" in e for e in stale), lab.mappings("rport")

    # The firewalled node comes up and reaches it through a relay; DCUtR punches the very same
    # port pair (whether its own connect or the nodes' DHT traffic starts the punch).
    blocked = start_peers(lab, ["hblk"], relays)["hblk"]
    result = blocked.command(
        timeout=60, cmd="connect", peer=behind_nat.peer_id, addrs=behind_nat.addrs
    )
    assert result["path"] == "holepunched" and result["transport"] == "tcp", result
    # The first punch got through: the stale side's SYN had left before the peer was told to
    # dial (when it was only scheduled, the peer's SYN came first in ~1 run of 10 under load).
    assert result["punches"] == 1, result
