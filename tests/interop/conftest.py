"""Interop harness: run a scenario inside ONE private network namespace, judge its verdict.

The third-party `lattica` SDK sends STUN probes to public servers whenever a node starts, so it
only ever runs inside `unshare -rn` (loopback only, no route out). Each test starts
`unshare -rn <our python> tests/interop/scenario_<name>.py`; the scenario starts the SDK nodes it
needs (and our own node, in-process), checks, and prints a JSON verdict. Whatever happens, the
whole process group of the namespace is killed at the end, so nothing outlives the test.

The SDK lives in its own venv (`.lab-venvs/lattica`, pinned version), built on first use. When it
cannot be built (no package index) the tests skip with the reason, except under CI (`CI` set),
where that is a failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import lattica_sdk  # the lab shared with the benchmarks (repo root on sys.path)

HERE = Path(__file__).resolve().parent
SCENARIO_TIMEOUT_S = 100.0  # normally a few seconds; the margin is for a loaded machine


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"interop tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lattica_python() -> Path:
    """The python of the lattica SDK venv; skips (fails in CI) when it cannot exist here."""
    reason = lattica_sdk.netns_unavailable_reason()
    if reason is not None:
        _unavailable(reason)
    try:
        return lattica_sdk.lattica_python()
    except lattica_sdk.LatticaUnavailable as exc:
        _unavailable(str(exc))
        raise  # unreachable: skip/fail raise


@pytest.fixture
def run_scenario(lattica_python: Path, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Run tests/interop/scenario_<name>.py in a private namespace; its verdict, all checks passed.

    The scenario's stderr (its own log and every SDK node's log) is kept in tmp_path and its tail
    goes into the failure message.
    """

    def run(name: str, *args: str, timeout: float = SCENARIO_TIMEOUT_S) -> dict[str, Any]:
        script = HERE / f"scenario_{name}.py"
        argv = [
            sys.executable,
            script,
            "--lattica-python",
            lattica_python,
            "--timeout",
            str(timeout - 10),
            *args,
        ]
        log_file = tmp_path / f"scenario_{name}.log"
        try:
            result = lattica_sdk.run_in_private_netns(argv, timeout=timeout)
        except TimeoutError as exc:
            pytest.fail(f"scenario {name}: {exc}")
        log_file.write_text(result.stderr)
        tail = f"\n--- stderr tail ({log_file}) ---\n{result.stderr[-6000:]}"
        try:
            verdict = lattica_sdk.last_json_line(result.stdout)
        except ValueError as exc:
            pytest.fail(
                f"scenario {name} printed no verdict (exit {result.returncode}): {exc}{tail}"
            )
        if verdict.get("unsupported"):
            pytest.skip(f"scenario {name}: {verdict['unsupported']}")
        failed = [check for check in verdict["checks"] if not check["ok"]]
        if verdict["error"] or failed or not verdict["checks"]:
            lines = [f"  FAILED {c['name']}: {c['detail']}" for c in failed]
            passed = [c["name"] for c in verdict["checks"] if c["ok"]]
            pytest.fail(
                f"scenario {name}: error={verdict['error']}\n"
                + "\n".join(lines)
                + f"\n  passed: {passed}{tail}"
            )
        return verdict

    return run
