"""Worker processes that die with the process that forked them.

datasets' `map(num_proc=N)` forks a pool of workers and a manager process. When the parent is
killed with SIGKILL nothing tells them: they wait on their queues forever. Inside
`die_with_parent()`, every process forked from this one asks the kernel (prctl PR_SET_PDEATHSIG)
for SIGKILL when its parent goes away. Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from typing import Iterator

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_enabled = False
_forking_pid = 0


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    if not _enabled or _libc is None:
        return
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _forking_pid:  # the parent died before the request took effect
        os._exit(1)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def die_with_parent() -> Iterator[None]:
    """Processes forked inside this block (and, in turn, their children) die with their parent."""
    global _enabled
    previous, _enabled = _enabled, True
    try:
        yield
    finally:
        _enabled = previous
