"""Local Ray clusters and drivers for tests, benchmarks and `lattica-ray demo`.

Each `LocalRayCluster` is a separate `ray start --head --block` in its own process session,
with its own temp dir, ports, loopback IP and auth token, so several run side by side on one
machine; it is stopped by its own PIDs (never `ray stop`, which ends every Ray on the machine).
A cluster can also run inside a network namespace (a NAT lab host: `netns=`), and take extra
nodes (`add_node`: a second raylet with its own IP, temp dir and resources, for measuring
Ray's own cross-node transfers).

Token authentication (on by default for local clusters since Ray 2.59) is set explicitly: every
process of a cluster and every driver that joins it gets `RAY_AUTH_MODE=token` and
`RAY_AUTH_TOKEN_PATH=<the cluster's token file>`. Ray reads the token from `RAY_AUTH_TOKEN`, then
`RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token`; `ray start` and `ray.init(address=...)` never
create one, and `ray.init(address=...)` with an explicit address does not turn token mode on by
itself, so a driver without these variables is refused by a token cluster.

A `RayDriver` is a Python subprocess connected to one cluster; `driver.call(fn, *args)` runs a
function there (shipped by value with cloudpickle over a private pipe) and returns its result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RAY_STARTED_MARKER = "Ray runtime started"
# Ray's default ports: used as they are inside a network namespace, which is ours alone.
DEFAULT_PORTS = {
    "--port": 6379,
    "--dashboard-port": 8265,
    "--ray-client-server-port": 10001,
    "--dashboard-agent-listen-port": 52365,
}
# Ports `ray start` would otherwise take at fixed defaults, so two clusters would collide.
FIXED_PORT_OPTIONS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
)


class ClusterError(RuntimeError):
    """A local Ray cluster or driver failed to start, answer or stop; the message has its log."""


@dataclass(frozen=True)
class RayAuth:
    """A Ray token-auth setting: a token file, exported to processes as environment variables."""

    token_path: Path

    @classmethod
    def generate(cls, directory: Path) -> RayAuth:
        """Write a fresh random token (readable by the owner only) into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "auth_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return cls(path)

    def env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}


# Variables that would point a child at some other cluster or token than the one we give it.
_INHERITED_RAY_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_RAY_VARS}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


def netns_prefix(netns: str | None) -> list[str]:
    """The command prefix that runs a program inside network namespace `netns` (if any)."""
    return ["ip", "netns", "exec", netns] if netns else []


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalRayCluster:
    """One single-node Ray cluster on this machine, in its own session, dir, ports and IP.

    `node_ip` is a loopback address (127.0.0.2, 127.0.0.3, ...): Ray rewrites 127.0.0.1 to the
    machine's outward address, any other 127/8 address it uses as given, so everything stays on
    loopback and each cluster is told apart by IP as well as by port. With `netns`, every process
    of the cluster (and of its drivers) runs in that network namespace and `node_ip` is the
    namespace's address.
    """

    name: str
    node_ip: str = "127.0.0.2"
    num_cpus: int = 2
    object_store_memory: int = 512 * 1024 * 1024
    auth: bool = True
    root: Path | None = (
        None  # temp dir root; a fresh one under /tmp if None (socket paths are short)
    )
    extra_env: dict[str, str] = field(default_factory=dict)
    keep_files: bool = False  # keep the temp dir (logs) after stop(); it is removed otherwise
    netns: str | None = None  # run in this network namespace (a NAT lab host)
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources

    def __post_init__(self) -> None:
        self._owns_root = self.root is None
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix=f"lr-{self.name}-", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.temp_dir = self.root / "ray"
        self.log_path = self.root / "ray_start.log"
        self.ray_auth = RayAuth.generate(self.root) if self.auth else None
        if self.netns:
            self.ports = dict(DEFAULT_PORTS)
        else:
            self.ports = {opt: free_port(self.node_ip) for opt in FIXED_PORT_OPTIONS}
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.nodes: list[LocalRayNode] = []

    @property
    def address(self) -> str:
        return f"{self.node_ip}:{self.ports['--port']}"

    @property
    def env(self) -> dict[str, str]:
        """What a process joining this cluster needs in its environment (auth settings)."""
        env = dict(self.extra_env)
        if self.ray_auth is not None:
            env.update(self.ray_auth.env())
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def command_prefix(self) -> list[str]:
        """What runs a program where this cluster's processes run (its namespace, if any)."""
        return netns_prefix(self.netns)

    def start(self, timeout: float = 90.0) -> LocalRayCluster:
        """Start the head and return once it accepts drivers; raise `ClusterError` with its log."""
        self.launch()
        return self.wait_started(timeout)

    def launch(self) -> None:
        """Start `ray start --head` without waiting (`wait_started` waits): clusters that
        start side by side overlap their start-up."""
        if self._process is not None:
            raise ClusterError(f"cluster {self.name} is already started")
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [
            *self.command_prefix,
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--node-ip-address={self.node_ip}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_memory}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--dashboard-host={self.node_ip}",
            *(f"{opt}={port}" for opt, port in self.ports.items()),
            *([f"--resources={json.dumps(self.resources)}"] if self.resources else []),
        ]
        self._log_file = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=child_env(self.env),
            start_new_session=True,  # its own process group: stop() can end all of it
        )
        logger.info("starting Ray cluster %s at %s (pid %d)", self.name, self.address, self.pid)

    def wait_started(self, timeout: float = 90.0) -> LocalRayCluster:
        """Return once the launched head accepts drivers; stop it and raise if it cannot."""
        if self._process is None:
            raise ClusterError(f"cluster {self.name} was not launched")
        try:
            _wait_for_marker(self._process, self.log_path, timeout, f"cluster {self.name}")
        except ClusterError:
            self.stop()
            raise
        return self

    def add_node(
        self,
        node_ip: str,
        *,
        num_cpus: int = 1,
        resources: dict[str, float] | None = None,
        object_store_memory: int | None = None,
        timeout: float = 90.0,
    ) -> LocalRayNode:
        """Join a second raylet to this cluster (`ray start --address`), with its own IP,
        temp dir, object store and `resources` (so actors can be pinned on it)."""
        if self._process is None:
            raise ClusterError(f"cluster {self.name} is not started")
        node = LocalRayNode(
            self,
            node_ip,
            num_cpus,
            dict(resources or {}),
            object_store_memory or self.object_store_memory,
        )
        self.nodes.append(node)
        node.start(timeout)
        return node

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """End every process of this cluster: SIGTERM to `ray start` (it drains and stops its
        children), then SIGKILL to whatever is left in its process group or still names our
        temp dir (workers the raylet spawned). Extra nodes stop first."""
        for node in self.nodes:
            node.stop(timeout)
        self.nodes.clear()
        process, self._process = self._process, None
        if process is not None:
            _stop_process(process, timeout, f"cluster {self.name}")
        _kill_mentioning(str(self.temp_dir))
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._owns_root and not self.keep_files and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalRayNode:
    """A second node of a `LocalRayCluster`: `ray start --address=<head> --block` with its own
    IP, temp dir and object store; stopped with its cluster (or by `stop()`)."""

    def __init__(
        self,
        cluster: LocalRayCluster,
        node_ip: str,
        num_cpus: int,
        resources: dict[str, float],
        object_store_memory: int,
    ) -> None:
        assert cluster.root is not None
        self.cluster = cluster
        self.node_ip = node_ip
        self.num_cpus = num_cpus
        self.resources = resources
        self.object_store_memory = object_store_memory
        index = len(cluster.nodes) + 1
        self.temp_dir = cluster.root / f"node{index}"
        self.log_path = cluster.root / f"ray_start_node{index}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 90.0) -> LocalRayNode:
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [
            *self.cluster.command_prefix,
            ray_bin,
            "start",
            f"--address={self.cluster.address}",
            "--block",
            f"--node-ip-address={self.node_ip}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_memory}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port(self.node_ip)}",
            *([f"--resources={json.dumps(self.resources)}"] if self.resources else []),
        ]
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(self.cluster.env),
                start_new_session=True,
            )
        what = f"node {self.node_ip} of cluster {self.cluster.name}"
        try:
            _wait_for_marker(self._process, self.log_path, timeout, what)
        except ClusterError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None:
            _stop_process(process, timeout, f"node {self.node_ip}")
        _kill_mentioning(str(self.temp_dir))


def start_clusters(clusters: list[LocalRayCluster], timeout: float = 120.0) -> None:
    """Start several clusters side by side (their start-ups overlap); on failure stop all."""
    try:
        for cluster in clusters:
            cluster.launch()
        for cluster in clusters:
            cluster.wait_started(timeout)
    except BaseException:
        stop_clusters(clusters)
        raise


def stop_clusters(clusters: list[LocalRayCluster], timeout: float = 5.0) -> None:
    """Stop several clusters at once (each drains for up to `timeout` s in parallel)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max(1, len(clusters))) as pool:
        for future in [pool.submit(c.stop, timeout) for c in clusters]:
            try:
                future.result()
            except Exception:
                logger.exception("stopping a cluster failed")


def _wait_for_marker(
    process: subprocess.Popen[bytes], log_path: Path, timeout: float, what: str
) -> None:
    def log_text() -> str:
        try:
            return log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    deadline = time.monotonic() + timeout
    while RAY_STARTED_MARKER not in log_text():
        if process.poll() is not None:
            raise ClusterError(f"ray start for {what} exited early:\n{log_text()}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not up after {timeout:.0f} s:\n{log_text()}")
        time.sleep(0.1)


def _stop_process(process: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:  # it drains actors for up to 30 s
        logger.info("%s still draining after %.0f s: killing it", what, timeout)
    _kill_group(process.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def _kill_mentioning(text: str) -> None:
    for pid in pids_mentioning(text):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (our unique temp dir), excluding ourselves."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# -- drivers ----------------------------------------------------------------------------------


class DriverError(RuntimeError):
    """The function run in a driver raised; the message carries the driver-side traceback."""

    def __init__(self, message: str, remote_type: str, remote_traceback: str) -> None:
        super().__init__(f"{remote_type}: {message}\n--- driver traceback ---\n{remote_traceback}")
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback


class RayDriver:
    """A Python process connected to one `LocalRayCluster` that runs the functions it is sent.

    One process can be the driver of one Ray cluster only, so a test that plays both sides of a
    cross-cluster call runs one `RayDriver` per cluster. Functions are pickled by value, so
    they may be defined in a test module that the driver cannot import.
    """

    def __init__(self, cluster: LocalRayCluster, namespace: str | None = None) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.log_path = (cluster.root or Path("/tmp")) / f"driver-{secrets.token_hex(3)}.log"

    def start(self, timeout: float = 60.0) -> RayDriver:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        cmd = [
            *self.cluster.command_prefix,
            sys.executable,
            "-m",
            "lattica_ray.ray.clusters",
            self.cluster.address,
            self.cluster.node_ip,
            self.namespace or "",
            str(to_child_r),
            str(from_child_w),
        ]
        log = open(self.log_path, "ab")
        try:
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(self.cluster.env),
                pass_fds=(to_child_r, from_child_w),
                start_new_session=True,
            )
        finally:
            log.close()
            os.close(to_child_r)
            os.close(from_child_w)
        self._conn = _Duplex(from_child_r, to_child_w)
        self._receive(timeout, "connect to Ray")  # the driver says hello once ray.init is done
        return self

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` in the driver; raise `DriverError` if it raised there.

        On timeout the driver is killed and restarted (its state is unknown), and
        `TimeoutError` is raised.
        """
        from ray import cloudpickle

        if self._conn is None:
            raise ClusterError("driver is not started")
        # The function's package (a test suite, a script) may not be importable in the
        # driver: ship its modules by value. Installed packages go by reference.
        top = fn.__module__.split(".")[0]
        if top not in ("lattica_ray", "transport", "ray"):
            for name, module in list(sys.modules.items()):
                if module is not None and (name == top or name.startswith(top + ".")):
                    cloudpickle.register_pickle_by_value(module)
        self._conn.send_bytes(cloudpickle.dumps((fn, args, kwargs)))
        try:
            return self._receive(timeout, getattr(fn, "__name__", "call"))
        except TimeoutError:
            self.stop()
            self.start()
            raise

    def _receive(self, timeout: float, what: str) -> Any:
        from ray import cloudpickle

        assert self._conn is not None and self._process is not None
        if not self._conn.poll(timeout):
            if self._process.poll() is not None:
                raise ClusterError(f"driver exited during {what}:\n{self.log_text()}")
            raise TimeoutError(f"driver did not finish {what} within {timeout:.0f} s")
        try:
            kind, *payload = cloudpickle.loads(self._conn.recv_bytes())
        except EOFError:
            raise ClusterError(f"driver exited during {what}:\n{self.log_text()}") from None
        if kind == "ok":
            return payload[0]
        message, remote_type, remote_traceback, original = payload
        error = DriverError(message, remote_type, remote_traceback)
        if original is not None:
            raise original from error
        raise error

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # the driver sees EOF, calls ray.shutdown() and exits
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            logger.warning("driver %d did not exit; killing it", process.pid)
            _kill_group(process.pid)
            process.wait(5)

    def __enter__(self) -> RayDriver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Duplex(Connection):
    """A `Connection` that reads one pipe and writes another."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        super().__init__(read_fd, readable=True, writable=False)
        self._writer = Connection(write_fd, readable=False, writable=True)

    def send_bytes(self, buf: bytes, offset: int = 0, size: int | None = None) -> None:  # type: ignore[override]
        self._writer.send_bytes(buf, offset, size)

    def close(self) -> None:
        self._writer.close()
        super().close()


def _serve_driver(address: str, node_ip: str, namespace: str, read_fd: int, write_fd: int) -> None:
    """The driver process: connect to Ray, then run calls until the pipe closes."""
    import ray
    from ray import cloudpickle

    conn = _Duplex(read_fd, write_fd)
    ray.init(
        address=address,
        _node_ip_address=node_ip,
        namespace=namespace or None,
        log_to_driver=True,
        logging_level=logging.WARNING,
    )
    conn.send_bytes(cloudpickle.dumps(("ok", None)))
    try:
        while True:
            try:
                request = conn.recv_bytes()
            except EOFError:
                break
            try:
                fn, args, kwargs = cloudpickle.loads(request)
                data = cloudpickle.dumps(("ok", fn(*args, **kwargs)))
            except BaseException as exc:  # every failure goes back to the caller
                data = _error_reply(exc, traceback.format_exc())
            conn.send_bytes(data)
    finally:
        ray.shutdown()


def _error_reply(exc: BaseException, text: str) -> bytes:
    """The exception itself when it pickles (so callers can catch its type), else its text."""
    from ray import cloudpickle

    head = ("err", str(exc), type(exc).__qualname__, text)
    try:
        return cloudpickle.dumps((*head, exc))
    except Exception:
        return cloudpickle.dumps((*head, None))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    _serve_driver(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
