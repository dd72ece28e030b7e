"""The `lattica-ray` command as users run it: real processes, signals, JSON output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

CLI = [sys.executable, "-m", "lattica_ray.cli"]


@pytest.fixture
def running_node(tmp_path) -> Iterator[tuple[subprocess.Popen[str], dict]]:
    process = subprocess.Popen(
        [*CLI, "node", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--key", str(tmp_path / "k")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        yield process, json.loads(line)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for pipe in (process.stdout, process.stderr):
            pipe.close()


def test_node_prints_one_json_line_and_stops_on_sigterm(running_node) -> None:
    process, announced = running_node
    assert announced["peer_id"].startswith("12D3KooW")
    assert announced["addrs"] and announced["addrs"][0].endswith("/p2p/" + announced["peer_id"])
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert "stopping on signal" in process.stderr.read()


def test_node_stops_on_sigint(running_node) -> None:
    process, _ = running_node
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == 0


def test_ping_prints_rtt_and_path_as_json(running_node) -> None:
    _, announced = running_node
    result = subprocess.run(
        [*CLI, "ping", announced["addrs"][0], "--count", "3", "--interval", "0.05", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["seq"] for line in lines] == [0, 1, 2]
    assert all(line["path"] == "direct" and line["rtt_ms"] > 0 for line in lines)


def test_ping_of_a_bad_target_says_what_to_do() -> None:
    result = subprocess.run(
        [*CLI, "ping", "/ip4/127.0.0.1/tcp/nonsense"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "what to do" in result.stderr


def test_ping_of_a_silent_peer_fails_with_a_hint(running_node) -> None:
    _, announced = running_node
    # Right peer ID, wrong port: nobody answers.
    target = f"/ip4/127.0.0.1/udp/9/quic-v1/p2p/{announced['peer_id']}"
    result = subprocess.run(
        [*CLI, "ping", target, "--count", "1", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "seq=0 error" in result.stdout
    assert "what to do" in result.stderr


def test_node_refuses_a_corrupt_key_file(tmp_path) -> None:
    key = tmp_path / "bad.key"
    key.write_bytes(b"garbage")
    result = subprocess.run(
        [*CLI, "node", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--key", str(key)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "error:" in result.stderr
    assert key.read_bytes() == b"garbage"


# `lattica-ray demo` (three Ray clusters) is exercised by tests/ray/test_demo.py.
