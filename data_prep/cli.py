"""What a data_prep command does on Ctrl-C: one line on stderr, not a traceback, and the shell's status
for SIGINT (130)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

EXIT_INTERRUPTED = 130  # 128 + SIGINT


@contextlib.contextmanager
def interrupt_exits(next_step: str) -> Iterator[None]:
    """A KeyboardInterrupt inside the block exits with "interrupted: `next_step`" and status 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: {next_step}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
