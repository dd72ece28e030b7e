"""The interop lab itself: the namespace has no way out, a timeout kills everything in it, the SDK
log parser reads the SDK's lines, and the SDK baseline benchmark runs end to end."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from benchmarks import lattica_sdk as lab
from tests.interop import lattica_peer as driver

PEER = "12D3KooWRDja2hPdGTyUd1tDRJ2HcdCvi8ddsmxwteVdFAiecsrB"
SDK_LINES = [  # as lattica 1.0.21 logs them (RUST_LOG=info,lattica::network=debug, NO_COLOR)
    "2026-11-25T12:56:20.453953Z  INFO lattica::network::core: Listening on: "
    f"/ip4/127.0.0.1/udp/40001/quic-v1/p2p/{PEER}",
    "2026-11-25T12:56:20.458675Z  INFO lattica::network::core: Connection established with "
    f"peer: {PEER}, via: /ip4/127.0.0.1/udp/40002/quic-v1, use: Some(Udp(40002)), "
    "is_direct: true",
    f"2026-11-25T12:56:20.459342Z DEBUG lattica::network::peers: Updated info for peer {PEER}: "
    "Info { public_key: PublicKey { publickey: Ed25519(PublicKey(compressed): e4dbdc79) }, "
    'protocol_version: "/lattica/1.0.0", agent_version: "rust-libp2p/0.45.0", listen_addrs: '
    '[/ip4/127.0.0.1/udp/40002/quic-v1], protocols: ["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"], '
    "observed_addr: /ip4/127.0.0.1/udp/40001/quic-v1 }",
    f"2026-11-25T12:56:20.460000Z DEBUG lattica::network::core: Updated RTT for peer {PEER}: "
    "512.1µs",
    "2026-11-25T12:56:21.000000Z DEBUG lattica::network::core: Connection closed with peer: "
    f"{PEER}",
]


def test_log_watcher_turns_sdk_lines_into_events():
    read_fd, write_fd = os.pipe()
    watcher = driver.LogWatcher(read_fd)
    with os.fdopen(write_fd, "w") as pipe:
        pipe.write("\n".join(SDK_LINES) + "\n")
    assert watcher.wait_for(lambda: len(watcher.events) == 3, timeout=5), watcher.events

    assert watcher.listen_addrs == [f"/ip4/127.0.0.1/udp/40001/quic-v1/p2p/{PEER}"]
    assert watcher.identify[PEER] == {
        "protocol_version": "/lattica/1.0.0",
        "agent_version": "rust-libp2p/0.45.0",
        "listen_addrs": ["/ip4/127.0.0.1/udp/40002/quic-v1"],
        "protocols": ["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"],
        "observed_addr": "/ip4/127.0.0.1/udp/40001/quic-v1",
    }
    assert watcher.pings_ok == {PEER: 1}
    assert [event["event"] for event in watcher.events] == ["connected", "identify", "closed"]
    assert watcher.connections[PEER] == 0


@pytest.fixture
def netns():
    reason = lab.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def test_private_namespace_has_loopback_and_no_route_out(netns):
    links = lab.run_in_private_netns(["ip", "-o", "link"], timeout=30)
    routes = lab.run_in_private_netns(["ip", "route", "get", "1.1.1.1"], timeout=30)
    assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"]
    assert "state UNKNOWN" in links.stdout or "LOWER_UP" in links.stdout  # lo is up
    assert routes.returncode != 0, routes.stdout  # "Network is unreachable"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # killed, waiting for its (new) parent to reap it


def test_timeout_kills_every_process_in_the_namespace(netns, tmp_path):
    pids_file = tmp_path / "pids"
    child = (
        "import os, subprocess, sys, time\n"
        "grandchild = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pids_file)!r}, 'w').write(f'{{os.getpid()}} {{grandchild.pid}}')\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(TimeoutError, match="ran over"):
        lab.run_in_private_netns([sys.executable, "-c", child], timeout=2)
    pids = [int(pid) for pid in pids_file.read_text().split()]
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL was sent; the kernel needs a moment to finish the exits
    assert all(_gone(pid) for pid in pids), pids


@pytest.mark.interop
def test_sdk_baseline_benchmark_runs(lattica_python):
    figures = lab.measure_lattica_sdk(transports=("quic",), payload=1 << 20, unary_count=20)
    quic = figures["transports"]["quic"]
    assert "/quic-v1" in quic["connection"][0]
    assert 0 < quic["unary_100B_p50_s"] <= quic["unary_100B_p99_s"] < 1.0
    assert quic["unary_100B_beside_0.5s_handler_s"] > 0
    assert quic["call_stream_upload_mb_s"] > 0 and quic["call_stream_download_mb_s"] > 0
    assert figures["best_call_stream_mb_s"] == max(
        quic["call_stream_upload_mb_s"], quic["call_stream_download_mb_s"]
    )
