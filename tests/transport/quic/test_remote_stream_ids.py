"""Which remote stream IDs are new: late data of a stream let go must not open another."""

from __future__ import annotations

from transport.quic.connection import RemoteStreamIds


def test_each_remote_stream_id_is_new_once_in_order() -> None:
    ids = RemoteStreamIds(first=0)  # a client's IDs, as the server sees them
    assert [ids.first_seen(i) for i in (0, 4, 8)] == [True, True, True]
    assert [ids.first_seen(i) for i in (0, 4, 8)] == [False, False, False]
    assert ids.first_seen(12)


def test_skipped_remote_ids_are_new_when_they_come_late() -> None:
    """Stream 13 arrives before 5 and 9 (reordering): 5 and 9 are still new, once."""
    ids = RemoteStreamIds(first=1)  # a server's IDs, as the client sees them
    assert ids.first_seen(13)
    assert ids.first_seen(9)
    assert ids.first_seen(5)
    assert ids.first_seen(1)
    assert not any(ids.first_seen(i) for i in (1, 5, 9, 13))
