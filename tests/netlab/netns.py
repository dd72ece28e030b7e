"""Thin helpers over `ip netns`, nsenter and setns(2) that the lab is built from."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x4000_0000
REQUIRED_TOOLS = ("ip", "nft", "iptables", "conntrack", "nsenter")
APT_PACKAGES = "iproute2 nftables iptables conntrack util-linux"
COMMAND_TIMEOUT_S = 30.0
KILL_WAIT_S = 5.0


class LabError(RuntimeError):
    """The lab could not be built, changed or torn down; the message says which step failed."""


def run(
    argv: list[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run a short setup command; on failure raise LabError carrying the command and stderr."""
    try:
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} is not installed (apt-get install -y {APT_PACKAGES})") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout} s") from exc
    if check and result.returncode != 0:
        shown = input if input is not None and len(input) < 4000 else ""
        raise LabError(
            f"{' '.join(argv)} failed (exit {result.returncode}): {result.stderr.strip()}"
            + (f"\ninput was:\n{shown}" if shown else "")
        )
    return result


def run_in(
    netns: str, argv: list[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a setup tool (nft, iptables, conntrack) in a namespace, cheaper than ip netns exec."""
    return run(["nsenter", f"--net={NETNS_DIR / netns}", *argv], input=input, check=check)


def ip_batch(lines: Iterable[str], *, netns: str | None = None) -> None:
    """Run many `ip` commands with one process (``ip [-n NS] -batch -``)."""
    script = "\n".join(lines) + "\n"
    if script.strip():
        run(["ip", *(["-n", netns] if netns else []), "-batch", "-"], input=script)


def call_in(netns: str, fn: Callable[..., T], *args: object) -> T:
    """Call ``fn(*args)`` on a thread that has entered ``netns``; other threads stay put.

    setns(CLONE_NEWNET) changes only the calling thread, and a socket keeps the namespace it
    was created in, so this is how the test process opens sockets inside lab hosts.
    """
    outcome: list[tuple[bool, object]] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append((True, fn(*args)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]


def socket_in(
    netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
) -> socket.socket:
    """A socket that lives in ``netns`` (bind, connect and traffic all happen there)."""
    return call_in(netns, socket.socket, family, type, proto)


def write_sysctls(netns: str, values: dict[str, str]) -> None:
    """Set sysctls (dotted names) inside ``netns`` without starting a process."""

    def write() -> None:
        for name, value in values.items():
            Path("/proc/sys", *name.split(".")).write_text(value)

    call_in(netns, write)


def list_namespaces(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def namespace_pids(netns: str) -> list[int]:
    result = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in result.stdout.split()]


def kill_namespace_processes(netns: str, timeout: float = KILL_WAIT_S) -> list[int]:
    """SIGKILL every process still inside ``netns`` and wait until they are dead; their pids."""
    pids = namespace_pids(netns)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(process_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise LabError(f"processes {pids} in {netns} survived SIGKILL for {timeout} s")
        time.sleep(0.005)
    return pids


def process_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (dead, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def delete_namespaces(names: list[str]) -> None:
    """Remove namespaces (their veths go with them); already-gone ones are fine."""
    existing = [n for n in names if (NETNS_DIR / n).exists()]
    for name in existing:
        kill_namespace_processes(name)
    if existing:
        result = run(
            ["ip", "-force", "-batch", "-"],
            input="".join(f"netns del {n}\n" for n in existing),
            check=False,
        )
        left = [n for n in existing if (NETNS_DIR / n).exists()]
        if left:
            raise LabError(f"could not delete namespaces {left}: {result.stderr.strip()}")


def process_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (to tell a live owner from a reused pid), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 22 (starttime), counted after the ")" that ends the command name.
    return int(stat.rsplit(")", 1)[1].split()[19])


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


@functools.cache
def unavailable_reason() -> str | None:
    """Why this machine cannot host a lab (None if it can): checked by creating a namespace."""
    if not hasattr(os, "geteuid"):
        return "the NAT lab needs Linux network namespaces"
    if shutil.which("ip") is None:
        return f"`ip` is not installed (apt-get install -y {APT_PACKAGES})"
    probe = f"netlabprobe-{os.getpid()}"
    result = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} (not root)"
        return (
            f"cannot create network namespaces as {who}: {result.stderr.strip()}; "
            "the NAT lab needs root or CAP_NET_ADMIN + CAP_SYS_ADMIN"
        )
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None
