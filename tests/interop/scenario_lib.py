"""What every interop scenario script shares: its command line, its checks and its verdict.

A scenario runs INSIDE a private network namespace (the test starts it with
`benchmarks.lattica_sdk.run_in_private_netns`), starts the SDK nodes it needs as child processes
(`LatticaPeer`), and prints one JSON verdict on its last stdout line:
``{"ok": bool, "checks": [{"name", "ok", "detail"}], "error": str | None}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.lattica_sdk import LatticaPeer  # noqa: E402  (needs REPO on sys.path)

__all__ = ["LatticaPeer", "Verdict", "bare", "run"]


class Verdict:
    """Named checks with the evidence behind each, printed as one JSON line."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.error: str | None = None

    def check(self, name: str, ok: bool, **detail: Any) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def emit(self) -> None:
        ok = self.error is None and bool(self.checks) and all(c["ok"] for c in self.checks)
        verdict = {"ok": ok, "checks": self.checks, "error": self.error}
        print(json.dumps(verdict, default=str), flush=True)


def bare(addr: str) -> str:
    """A multiaddr without its /p2p/ suffix (observed and listen addresses carry none)."""
    return addr.split("/p2p/")[0]


def run(scenario: Callable[[argparse.Namespace, Verdict], Awaitable[None]]) -> None:
    """Parse the common options, run `scenario`, print the verdict, exit 0 (the verdict judges)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--lattica-python", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    verdict = Verdict()
    try:
        asyncio.run(asyncio.wait_for(scenario(args, verdict), args.timeout))
    except BaseException as exc:
        traceback.print_exc()
        verdict.error = f"{type(exc).__name__}: {exc}"
    verdict.emit()
    sys.exit(0)
