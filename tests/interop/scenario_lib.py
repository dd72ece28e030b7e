"""What every interop scenario script shares: its command line, its checks and its verdict.

A scenario runs INSIDE a private network namespace (the test starts it with
`benchmarks.lattica_sdk.run_in_private_netns`), starts the SDK nodes it needs as child processes
(`LatticaPeer`), and prints one JSON verdict on its last stdout line:
``{"ok": bool, "checks": [{"name", "ok", "detail"}], "error": str | None,
"unsupported": str | None}``.
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
        self.unsupported: str | None = None  # set when our side lacks what the scenario needs
        self.seconds: dict[str, float] = {}  # how long each part took

    def check(self, name: str, ok: bool, **detail: Any) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def emit(self) -> None:
        ok = self.error is None and bool(self.checks) and all(c["ok"] for c in self.checks)
        verdict = {
            "ok": ok,
            "checks": self.checks,
            "error": self.error,
            "unsupported": self.unsupported,
            "seconds": self.seconds,
        }
        print(json.dumps(verdict, default=str), flush=True)


def bare(addr: str) -> str:
    """A multiaddr without its /p2p/ suffix (observed and listen addresses carry none)."""
    return addr.split("/p2p/")[0]


Part = Callable[[argparse.Namespace, Verdict], Awaitable[None]]


def run(*parts: Part, options: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse the options, run each part, print the verdict, exit 0 (the verdict judges).

    A part that raises (or runs over --part-timeout) becomes a failed check named after it, and
    the next part still runs; all parts together stop at --timeout. Once a part sets
    `verdict.unsupported`, no further part runs. `options` adds the scenario's own options.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--lattica-python", required=True)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds for all parts")
    parser.add_argument("--part-timeout", type=float, default=30.0, help="seconds for one part")
    if options is not None:
        options(parser)
    args = parser.parse_args()
    verdict = Verdict()

    async def main() -> None:
        deadline = asyncio.get_running_loop().time() + args.timeout
        for part in parts:
            if verdict.unsupported:
                break
            started = asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(min(args.part_timeout, max(deadline - started, 0.0))):
                    await part(args, verdict)
            except Exception as exc:
                print(f"--- part {part.__name__} raised:", file=sys.stderr)
                traceback.print_exc()
                verdict.check(f"{part.__name__} ran to the end", False, error=repr(exc))
            verdict.seconds[part.__name__] = round(asyncio.get_running_loop().time() - started, 3)

    try:
        asyncio.run(main())
    except BaseException as exc:
        traceback.print_exc()
        verdict.error = f"{type(exc).__name__}: {exc}"
    verdict.emit()
    sys.exit(0)
