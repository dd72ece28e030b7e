"""PunchTracker, the state machine behind `NatManager.wait_direct`: when is punching with a peer
over (both roles, the peer's retries and the requests a new relayed connection brings)?"""

from __future__ import annotations

import pytest

from transport.identity import KeyPair
from transport.nat.punch_tracker import PunchTracker

PEER = KeyPair.generate().peer_id
GRACE = 3.0


def tracker() -> PunchTracker:
    return PunchTracker(retry_grace=GRACE, attempts=3)


def test_unknown_peer_is_over_with_no_outcome() -> None:
    state = tracker().state(PEER, 0.0)
    assert state.over and state.outcome == "" and (state.ours, state.theirs) == (0, 0)


def test_a_failed_answer_is_not_the_end_while_the_peer_may_retry() -> None:
    punches = tracker()
    punches.expect_request(PEER, 0.0)
    punches.serving_started(PEER, 0.1)
    punches.serving_ended(PEER, "failed: no direct path found", 5.1)
    state = punches.state(PEER, 5.2)
    assert not state.over and state.wake_at == 5.1 + GRACE  # its retry is due by then
    punches.serving_started(PEER, 5.3)  # the retry
    assert punches.state(PEER, 9.0).theirs == 2 and not punches.state(PEER, 9.0).over
    punches.serving_ended(PEER, "failed: no direct path found", 10.3)
    punches.serving_started(PEER, 10.4)
    punches.serving_ended(PEER, "failed: no direct path found", 15.4)
    state = punches.state(PEER, 15.4)  # its third and last: nothing more to wait for
    assert state.over and state.theirs == 3 and state.outcome == "failed: no direct path found"


def test_the_peer_that_stops_retrying_is_given_up_on_after_the_grace() -> None:
    punches = tracker()
    punches.serving_started(PEER, 0.0)
    punches.serving_ended(PEER, "failed: answering the peer's punch: EOFError: ", 1.0)
    assert not punches.state(PEER, 1.0 + GRACE - 0.01).over
    state = punches.state(PEER, 1.0 + GRACE)
    assert state.over and state.outcome.startswith("failed: answering")


def test_a_final_answer_ends_the_round_at_once() -> None:
    punches = tracker()
    punches.serving_started(PEER, 0.0)
    punches.serving_ended(PEER, "failed: both peers are behind symmetric NATs", 0.1, final=True)
    assert punches.state(PEER, 0.1).over
    punches.serving_started(PEER, 1.0)
    punches.serving_ended(PEER, "holepunched", 1.2)
    state = punches.state(PEER, 1.2)
    assert state.over and state.outcome == "holepunched"


def test_our_upgrade_and_their_punch_must_both_end() -> None:
    punches = tracker()
    punches.upgrade_started(PEER, 0.0)
    punches.attempt_started(PEER, 0.0)
    punches.serving_started(PEER, 0.5)  # their punch goes ahead (ours was refused)
    punches.upgrade_ended(PEER, "failed: the peer refused our request", 0.6)
    assert not punches.state(PEER, 0.6).over  # still answering theirs
    punches.serving_ended(PEER, "holepunched", 0.9)
    state = punches.state(PEER, 0.9)
    assert state.over and state.outcome == "holepunched" and (state.ours, state.theirs) == (1, 1)


def test_a_new_relayed_connection_starts_a_new_round() -> None:
    """An earlier round's failure must not answer for a later connection: the stale result
    of an earlier punch made `wait_direct` give up at once."""
    punches = tracker()
    punches.upgrade_started(PEER, 0.0)
    punches.attempt_started(PEER, 0.0)
    punches.upgrade_ended(PEER, "failed: no direct path found", 5.0)
    assert punches.state(PEER, 5.0).over
    punches.expect_request(PEER, 60.0)
    state = punches.state(PEER, 60.0)
    assert not state.over and state.outcome == "" and (state.ours, state.theirs) == (0, 0)
    assert state.wake_at == 60.0 + GRACE
    state = punches.state(PEER, 60.0 + GRACE)  # nobody asked: over, with no attempt made
    assert state.over and state.outcome == "" and state.ours == 0


def test_expecting_a_request_while_a_punch_runs_keeps_the_round() -> None:
    punches = tracker()
    punches.serving_started(PEER, 0.0)
    punches.expect_request(PEER, 0.1)  # (a second relayed connection meanwhile)
    assert punches.state(PEER, 0.2).theirs == 1


@pytest.mark.parametrize(("grace", "attempts"), [(-1.0, 3), (1.0, 0)])
def test_bad_limits_are_refused(grace: float, attempts: int) -> None:
    with pytest.raises(ValueError):
        PunchTracker(retry_grace=grace, attempts=attempts)
