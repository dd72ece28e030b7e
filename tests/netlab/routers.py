"""Router kinds of the NAT lab and the nftables rules that make each one behave as named.

Terms follow RFC 4787: *mapping* says whether one inside endpoint keeps one outside port for every
destination (endpoint-independent, EIM) or gets a new one per destination (endpoint-dependent);
*filtering* says which outside endpoints may send to that port.

How Linux is made to behave:
- MASQUERADE keeps the inside source port whenever that leaves conntrack tuples unique, so one
  inside socket keeps one outside port for all destinations: EIM. Conntrack then passes only
  packets from the exact endpoint that was contacted: address-and-port-dependent filtering.
- ``masquerade fully-random`` draws a new port for every new conntrack: endpoint-dependent mapping.
- Endpoint-independent filtering (full cone) needs the router to remember "outside port P belongs
  to inside endpoint H:p" (the ``eim_map``, learned from outgoing packets) and DNAT new inbound
  packets for P back to H:p. Address-dependent filtering (restricted cone) does the same only for
  senders whose address is in the ``contacted`` set (outside port . remote address, also learned
  from outgoing packets).
- Every router drops unsolicited inbound packets. Accepting them would let conntrack confirm an
  entry for the outside sender, and the inside host's next packet to that sender would then get a
  new port, which no real port-restricted NAT does and which breaks hole punching.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

TABLE = "netlab_router"
WAN_IFACE = "wan"
INBOUND_DROPPED = "inbound_dropped"  # nft counter: unsolicited packets from the WAN side, dropped
UDP_DROPPED = "udp_dropped"  # nft counter: UDP dropped by the udp_blocked firewall


class NatKind(enum.StrEnum):
    """What a lab router does to traffic between its LAN and the public segment."""

    FULL_CONE = "full_cone"  # EIM + endpoint-independent filtering
    RESTRICTED_CONE = "restricted_cone"  # EIM + address-dependent filtering
    PORT_RESTRICTED = "port_restricted"  # EIM + address-and-port-dependent filtering
    SYMMETRIC = "symmetric"  # endpoint-dependent mapping (new random port per destination)
    PUBLIC = "public"  # no NAT, no filtering: hosts have public addresses
    FIREWALL = "firewall"  # no NAT; drops every inbound packet that is not a reply
    UDP_BLOCKED = "udp_blocked"  # firewall that also drops all UDP, both ways (TCP only)


class Mapping(enum.StrEnum):
    NONE = "none"  # no translation: the outside sees the host's own address
    ENDPOINT_INDEPENDENT = "endpoint_independent"
    ENDPOINT_DEPENDENT = "endpoint_dependent"


class Filtering(enum.StrEnum):
    OPEN = "open"  # anyone may send
    ENDPOINT_INDEPENDENT = "endpoint_independent"  # anyone may send to a mapped port
    ADDRESS_DEPENDENT = "address_dependent"  # only addresses the inside endpoint sent to
    ADDRESS_AND_PORT_DEPENDENT = "address_and_port_dependent"  # only endpoints it sent to


@dataclass(frozen=True)
class Behaviour:
    """What a router kind promises; the lab tests check each router against this."""

    mapping: Mapping
    filtering: Filtering
    nat: bool
    udp: bool = True  # False: UDP does not pass at all

    @property
    def hole_punchable(self) -> bool:
        """True if a peer behind this router keeps one outside port for every destination."""
        return self.udp and self.mapping != Mapping.ENDPOINT_DEPENDENT


BEHAVIOUR: dict[NatKind, Behaviour] = {
    NatKind.FULL_CONE: Behaviour(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ENDPOINT_INDEPENDENT, True
    ),
    NatKind.RESTRICTED_CONE: Behaviour(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_DEPENDENT, True
    ),
    NatKind.PORT_RESTRICTED: Behaviour(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT, True
    ),
    NatKind.SYMMETRIC: Behaviour(
        Mapping.ENDPOINT_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT, True
    ),
    NatKind.PUBLIC: Behaviour(Mapping.NONE, Filtering.OPEN, False),
    NatKind.FIREWALL: Behaviour(Mapping.NONE, Filtering.ADDRESS_AND_PORT_DEPENDENT, False),
    NatKind.UDP_BLOCKED: Behaviour(
        Mapping.NONE, Filtering.ADDRESS_AND_PORT_DEPENDENT, False, udp=False
    ),
}


def router_ruleset(kind: NatKind, *, mapping_timeout_s: int = 120) -> str:
    """The complete nftables script for one router namespace (WAN interface ``wan``).

    ``mapping_timeout_s`` is how long a full/restricted cone keeps a port's inside endpoint and
    contacted addresses after the last outgoing packet (conntrack's own UDP timeouts apply to
    the translations themselves).
    """
    kind = NatKind(kind)
    behaviour = BEHAVIOUR[kind]
    cone = kind in (NatKind.FULL_CONE, NatKind.RESTRICTED_CONE)
    wan = f'"{WAN_IFACE}"'
    lines = [
        f"add table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        f"  counter {INBOUND_DROPPED} {{ }}",
        f"  counter {UDP_DROPPED} {{ }}",
    ]
    if cone:
        lines += [
            "  map eim_map {",
            "    type inet_proto . inet_service : ipv4_addr . inet_service",
            f"    flags dynamic,timeout; timeout {mapping_timeout_s}s;",
            "  }",
            "  set contacted {",
            "    type inet_proto . inet_service . ipv4_addr",
            f"    flags dynamic,timeout; timeout {mapping_timeout_s}s;",
            "  }",
        ]
    # Packets addressed to the router itself: only its LAN and replies get in.
    lines += [
        "  chain input {",
        "    type filter hook input priority filter; policy drop;",
        '    iifname "lo" accept',
        "    ct state established,related accept",
        f"    iifname != {wan} accept",
        f'    counter name "{INBOUND_DROPPED}" drop',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
    ]
    if not behaviour.udp:
        lines.append(f'    meta l4proto udp counter name "{UDP_DROPPED}" drop')
    lines += [
        "    ct state established,related accept",
        f"    iifname != {wan} accept",
    ]
    if cone:
        lines.append("    ct status dnat accept")
    if kind == NatKind.PUBLIC:
        lines.append("    accept")
    lines += [f'    counter name "{INBOUND_DROPPED}" drop', "  }"]
    if behaviour.nat:
        random_ports = " fully-random" if kind == NatKind.SYMMETRIC else ""
        lines += [
            "  chain nat_postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    oifname {wan} masquerade{random_ports}",
            "  }",
        ]
    if cone:
        admit = (
            "meta l4proto . th dport . ip saddr @contacted "
            if kind == NatKind.RESTRICTED_CONE
            else ""
        )
        lines += [
            # New inbound flows to a mapped port go to the inside endpoint that owns it.
            "  chain nat_prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f"    iifname {wan} meta l4proto {{ tcp, udp }} {admit}"
            "dnat to meta l4proto . th dport map @eim_map",
            "  }",
            # After masquerade (priority srcnat + 10) the packet carries its outside port.
            "  chain learn_mappings {",
            "    type filter hook postrouting priority srcnat + 10; policy accept;",
            f"    oifname != {wan} accept",
            "    meta l4proto != { tcp, udp } accept",
            "    update @contacted { meta l4proto . th sport . ip daddr }",
        ]
        # nft 1.0 types "ct ... proto-src" only once the protocol is known: one rule per protocol.
        for proto in ("udp", "tcp"):
            for direction in ("original", "reply"):
                lines.append(
                    f"    meta l4proto {proto} ct direction {direction} update @eim_map "
                    f"{{ meta l4proto . {proto} sport : "
                    f"ct {direction} ip saddr . ct {direction} proto-src }}"
                )
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def flush_mappings_script(kind: NatKind) -> str | None:
    """nft script that forgets learned cone mappings (with ``conntrack -F``: a NAT reboot)."""
    if NatKind(kind) not in (NatKind.FULL_CONE, NatKind.RESTRICTED_CONE):
        return None
    return f"flush map ip {TABLE} eim_map\nflush set ip {TABLE} contacted\n"
