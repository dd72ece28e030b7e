"""What a node knows about its own place in the network, from what peers tell it (no I/O).

- Observed addresses: identify tells us the address each peer saw our packets come from.
- Mapping behaviour (RFC 4787): if observers at two different IPs see the same external port,
  our NAT maps endpoint-independently (hole punching works with it); if they see different
  ports, it is endpoint-dependent ("symmetric") and the other side must do the punching.
- Reachability: AutoNAT dial-backs from other peers confirm or refute that a fresh socket can
  reach us; only confirmed addresses are advertised as direct.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from dataclasses import dataclass, field

from transport.identity import PeerId
from transport.multiaddr import Multiaddr

MAX_OBSERVATIONS = 64
OBSERVATION_TTL = 600.0  # seconds an observation stays relevant (NAT mappings change)
CONFIDENCE = 2  # agreeing AutoNAT answers needed to change our mind


class Mapping(enum.StrEnum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ENDPOINT_DEPENDENT = "endpoint-dependent"
    UNKNOWN = "unknown"


class Reachability(enum.StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Observation:
    observer: PeerId
    observer_ip: str
    observed: Multiaddr
    at: float


def _ip_of(addr: Multiaddr | None) -> str | None:
    if addr is None:
        return None
    return addr.value_for("ip4") or addr.value_for("ip6")


def _transport_key(addr: Multiaddr) -> tuple[str, ...]:
    return tuple(name for name, _ in addr.without_peer_id().components)


@dataclass
class AddressBook:
    """Observations of our addresses and AutoNAT verdicts. Time is injectable."""

    clock: object = time.time
    observations: dict[PeerId, Observation] = field(default_factory=dict)
    verdicts: dict[PeerId, bool] = field(default_factory=dict)
    confirmed: set[Multiaddr] = field(default_factory=set)

    def now(self) -> float:
        return self.clock()  # type: ignore[operator]

    def observe(
        self, observer: PeerId, observer_addr: Multiaddr | None, observed: Multiaddr
    ) -> None:
        """Record that `observer` (reached at `observer_addr`) saw us at `observed`."""
        ip = _ip_of(observer_addr)
        if ip is None or observed.is_relayed:
            return
        self.observations[observer] = Observation(
            observer, ip, observed.without_peer_id(), self.now()
        )
        if len(self.observations) > MAX_OBSERVATIONS:
            oldest = min(self.observations.values(), key=lambda o: o.at)
            del self.observations[oldest.observer]

    def _fresh(self) -> list[Observation]:
        horizon = self.now() - OBSERVATION_TTL
        return [o for o in self.observations.values() if o.at >= horizon]

    def observed_addrs(self) -> list[Multiaddr]:
        """Distinct observed addresses, the most often seen first."""
        counts = Counter(o.observed for o in self._fresh())
        return [addr for addr, _ in counts.most_common()]

    def mapping(self) -> Mapping:
        """Our NAT's mapping behaviour, judged from observers at distinct IPs."""
        by_transport: dict[tuple[str, ...], dict[str, Multiaddr]] = {}
        for observation in self._fresh():
            by_transport.setdefault(_transport_key(observation.observed), {})[
                observation.observer_ip
            ] = observation.observed
        verdict = Mapping.UNKNOWN
        for seen in by_transport.values():
            if len(seen) < 2:
                continue
            if len(set(seen.values())) > 1:
                return Mapping.ENDPOINT_DEPENDENT
            verdict = Mapping.ENDPOINT_INDEPENDENT
        return verdict

    # -- AutoNAT verdicts ---------------------------------------------------------------------
    def record_dial_back(self, server: PeerId, addr: Multiaddr | None, reachable: bool) -> None:
        self.verdicts[server] = reachable
        if reachable and addr is not None:
            self.confirmed.add(addr.without_peer_id())

    def reachability(self) -> Reachability:
        yes = sum(1 for ok in self.verdicts.values() if ok)
        no = len(self.verdicts) - yes
        if yes >= CONFIDENCE and yes > no:
            return Reachability.PUBLIC
        if no >= CONFIDENCE and no > yes:
            return Reachability.PRIVATE
        if yes and not no:
            return Reachability.PUBLIC if len(self.verdicts) >= CONFIDENCE else Reachability.UNKNOWN
        return Reachability.UNKNOWN
