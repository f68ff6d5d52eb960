"""The preflight's report: each check prints one `[  ok]` / `[warn]` / `[FAIL]` line as it goes
and the failures are collected, so that a node's log shows what passed before something failed
and the run ends with one summary on stderr and the exit status the launch scripts test."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)

    def ok(self, msg: str) -> None:
        self._add("ok", msg)

    def warn(self, msg: str) -> None:
        self._add("warn", msg)

    def fail(self, msg: str) -> None:
        self._add("FAIL", msg)

    def _add(self, level: str, msg: str) -> None:
        self.lines.append((level, msg))
        print(f"[{level:>4}] {msg}", flush=True)

    @property
    def failures(self) -> list[str]:
        return [m for lvl, m in self.lines if lvl == "FAIL"]


def summarize(rep: Report, node_rank: int) -> int:
    """Print the verdict for this node; the exit status: 1 when a check failed, else 0."""
    if rep.failures:
        print(
            f"preflight FAILED on node {node_rank} ({socket.gethostname()}): {len(rep.failures)} problem(s):",
            file=sys.stderr,
        )
        for m in rep.failures:
            print(f"  - {m}", file=sys.stderr)
        return 1
    print(f"preflight passed on node {node_rank} ({socket.gethostname()})", flush=True)
    return 0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError
