"""Link conditions (delay, jitter, loss, cut) without ``sch_netem``.

Every lab link is a veth pair. Each direction is shaped where its packets *arrive*: an nftables
chain on the receiving namespace's ingress (prerouting, before conntrack) drops packets for a
cut link or at random for loss (``numgen random``), and marks packets that need delay; an
iptables NFQUEUE rule hands marked packets to :mod:`tests.netlab.linkemu`, which releases each
one after its delay. So a condition set on a link applies to both directions independently:
``delay_ms=40`` adds 80 ms to a round trip, ``loss=0.1`` loses 10% of packets each way.

A veth passes TSO/GSO super-packets (up to 64 KiB: ~45 TCP segments, or a whole UDP GSO batch)
unsegmented, and the ingress chain sees each as one packet: one loss draw would cover them all,
so TCP would see a fraction of the asked loss. A shaped direction's sending end therefore gets
``gso_max_segs 1`` (:func:`segmentation_command`), which makes the kernel segment in software
before the veth, and every MTU-sized packet draws its own loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Packet mark layout, read back by tests.netlab.linkemu: bit 31 says "delay me", bits 16..30 hold
# the one-way delay in ms, bits 0..15 the jitter in ms.
DELAY_FLAG = 0x8000_0000
MAX_DELAY_MS = 0x7FFF
MAX_JITTER_MS = 0xFFFF

TABLE = "netlab_links"
# Before conntrack (-200) and before the raw-table NFQUEUE rule (-300): a dropped or queued
# packet must not have created a conntrack entry yet.
INGRESS_PRIORITY = -310
LOSS_SCALE = 1_000_000  # loss is drawn with this resolution (numgen random mod LOSS_SCALE)
GSO_MAX_SEGS = 65535  # include/linux/netdevice.h: a veth's default, super-packets allowed
SEGMENTED = 1  # one segment per packet: the kernel segments before the veth

# iptables (nft backend) target; nft's own "queue" statement needs nft_queue, absent here.
QUEUE_RULE = [
    "iptables", "-w", "-t", "raw", "-A", "PREROUTING",
    "-m", "mark", "--mark", f"{DELAY_FLAG:#x}/{DELAY_FLAG:#x}",
    "-j", "NFQUEUE", "--queue-num", "0",
]  # fmt: skip


@dataclass(frozen=True)
class LinkCondition:
    """What happens to packets arriving over one direction of a link."""

    delay_ms: int = 0
    jitter_ms: int = 0
    loss: float = 0.0
    cut: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"delay_ms must be within 0..{MAX_DELAY_MS}, got {self.delay_ms}")
        if not 0 <= self.jitter_ms <= MAX_JITTER_MS:
            raise ValueError(f"jitter_ms must be within 0..{MAX_JITTER_MS}, got {self.jitter_ms}")
        if self.jitter_ms > self.delay_ms:
            raise ValueError(
                f"jitter_ms ({self.jitter_ms}) must not exceed delay_ms ({self.delay_ms})"
            )
        if not (math.isfinite(self.loss) and 0.0 <= self.loss <= 1.0):
            raise ValueError(f"loss must be a fraction within 0..1, got {self.loss}")

    @property
    def delayed(self) -> bool:
        return self.delay_ms > 0

    @property
    def clean(self) -> bool:
        return self == LinkCondition()

    @property
    def per_packet(self) -> bool:
        """Loss or delay: each MTU-sized packet must be drawn and held on its own."""
        return self.loss > 0 or self.delayed


def delay_mark(delay_ms: int, jitter_ms: int) -> int:
    """Packet mark that asks the delayer for ``delay_ms`` +- ``jitter_ms`` one-way delay."""
    if not 0 <= delay_ms <= MAX_DELAY_MS:
        raise ValueError(f"delay_ms must be within 0..{MAX_DELAY_MS}, got {delay_ms}")
    if not 0 <= jitter_ms <= MAX_JITTER_MS:
        raise ValueError(f"jitter_ms must be within 0..{MAX_JITTER_MS}, got {jitter_ms}")
    return DELAY_FLAG | (delay_ms << 16) | jitter_ms


def segmentation_command(netns: str, iface: str, condition: LinkCondition) -> list[str]:
    """The ``ip`` command that makes ``iface`` (the sending end of one direction) send MTU-sized
    packets when ``condition`` acts per packet, and super-packets again when it does not."""
    segments = SEGMENTED if condition.per_packet else GSO_MAX_SEGS
    return ["ip", "-n", netns, "link", "set", "dev", iface, "gso_max_segs", str(segments)]


def counter_name(iface: str) -> str:
    """Name of the nft counter that counts packets dropped (cut or loss) arriving on ``iface``."""
    return "dropped_" + iface.replace("-", "_")


def links_ruleset(conditions: dict[str, LinkCondition]) -> str:
    """The complete nftables script shaping every link that arrives in one namespace."""
    lines = [
        f"add table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
    ]
    for iface in sorted(conditions):
        lines.append(f"  counter {counter_name(iface)} {{ }}")
    lines += [
        "  chain ingress {",
        f"    type filter hook prerouting priority {INGRESS_PRIORITY}; policy accept;",
    ]
    for iface, condition in sorted(conditions.items()):
        match = f'iifname "{iface}"'
        count = f'counter name "{counter_name(iface)}"'
        if condition.cut:
            lines.append(f"    {match} {count} drop")
            continue
        if condition.loss > 0:
            threshold = round(condition.loss * LOSS_SCALE)
            lines.append(f"    {match} numgen random mod {LOSS_SCALE} < {threshold} {count} drop")
        if condition.delayed:
            mark = delay_mark(condition.delay_ms, condition.jitter_ms)
            lines.append(f"    {match} meta mark set {mark:#x}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"
