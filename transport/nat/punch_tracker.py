"""Which hole-punch attempts with each peer are under way or still to come, in both roles.

Sans-I/O: the caller passes the time in. A peer's punching is *over* once our own upgrade (as
DCUtR's B) has ended, no punch we answer (as A) is running, and the peer is not expected to ask
again: the peer may retry a failed attempt (DCUtR: B tries up to three times) and a new relayed
connection brings a new request, each within `retry_grace` seconds. The first event after an
over state starts a new round, so an outcome of an earlier connection never answers for a
later one.
"""

from __future__ import annotations

from dataclasses import dataclass

from transport.identity import PeerId

DCUTR_ATTEMPTS = 3  # DCUtR spec: the inbound peer (B) tries three times
RETRY_GRACE = 5.0  # seconds a request from the peer is still expected (a retry, a new relay)


@dataclass
class PunchState:
    """A peer's punching as one side sees it."""

    over: bool
    outcome: str  # "holepunched" / "failed: <reason>" / "" while nothing ended yet
    ours: int  # attempts we started (as B) this round
    theirs: int  # attempts of the peer we answered (as A) this round
    wake_at: float | None  # when `over` may turn true with no event (an expectation expires)

    def describe(self) -> str:
        return f"{self.outcome or 'no outcome'} (attempts: ours {self.ours}, theirs {self.theirs})"


@dataclass
class _Round:
    upgrading: bool = False  # our upgrade (as B) runs
    serving: int = 0  # the peer's attempts we answer right now
    ours: int = 0
    theirs: int = 0
    outcome: str = ""
    expect_until: float | None = None  # a request from the peer is expected until then
    peer_done: bool = False  # the peer will not try again (it said so, or it cannot)


class PunchTracker:
    """Per-peer punch rounds: what is running, what is expected, how the last attempt ended."""

    def __init__(self, retry_grace: float = RETRY_GRACE, attempts: int = DCUTR_ATTEMPTS) -> None:
        if retry_grace < 0 or attempts < 1:
            raise ValueError("retry_grace must be >= 0 and attempts >= 1")
        self.retry_grace = retry_grace
        self.attempts = attempts
        self._rounds: dict[PeerId, _Round] = {}

    def _round(self, peer: PeerId, now: float) -> _Round:
        """The peer's current round; a fresh one if the last is over."""
        current = self._rounds.get(peer)
        if current is None or self.state(peer, now).over:
            current = self._rounds[peer] = _Round()
        return current

    # -- events ---------------------------------------------------------------------------
    def expect_request(self, peer: PeerId, now: float) -> None:
        """A relayed connection with `peer` came up: a punch request should follow soon."""
        current = self._round(peer, now)
        current.expect_until = now + self.retry_grace
        current.peer_done = False

    def upgrade_started(self, peer: PeerId, now: float) -> None:
        current = self._round(peer, now)
        current.upgrading = True
        if current.theirs == 0:  # the punch a new relayed connection calls for: ours
            current.expect_until = None

    def attempt_started(self, peer: PeerId, now: float) -> None:
        """One of our attempts (as B) begins."""
        current = self._round(peer, now)
        current.upgrading = True
        current.ours += 1

    def upgrade_ended(self, peer: PeerId, outcome: str, now: float) -> None:
        current = self._round(peer, now)
        current.upgrading = False
        current.outcome = outcome

    def serving_started(self, peer: PeerId, now: float) -> None:
        """The peer's attempt arrived; we answer it (as A)."""
        current = self._round(peer, now)
        current.serving += 1
        current.theirs += 1
        current.expect_until = None

    def serving_ended(self, peer: PeerId, outcome: str, now: float, final: bool = False) -> None:
        """The peer's attempt ended; unless `final` (or its last), it may try again."""
        current = self._rounds.setdefault(peer, _Round())
        current.serving = max(0, current.serving - 1)
        current.outcome = outcome
        if final or outcome == "holepunched" or current.theirs >= self.attempts:
            current.peer_done = True
            current.expect_until = None
        else:
            current.expect_until = now + self.retry_grace

    def forget(self, peer: PeerId) -> None:
        self._rounds.pop(peer, None)

    # -- queries --------------------------------------------------------------------------
    def state(self, peer: PeerId, now: float) -> PunchState:
        current = self._rounds.get(peer)
        if current is None:
            return PunchState(True, "", 0, 0, None)
        expecting = not current.peer_done and (
            current.expect_until is not None and now < current.expect_until
        )
        running = current.upgrading or current.serving > 0
        return PunchState(
            over=not (running or expecting),
            outcome=current.outcome,
            ours=current.ours,
            theirs=current.theirs,
            wake_at=current.expect_until if expecting and not running else None,
        )
