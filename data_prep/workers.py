"""Worker processes that die with the process that forked them, and a Ctrl-C that waits for them.

datasets' `map(num_proc=N)` forks a pool of workers and a manager process. When the parent is
killed with SIGKILL nothing tells them: they wait on their queues forever. Inside
`die_with_parent()`, every process forked from this one asks the kernel (prctl PR_SET_PDEATHSIG)
for SIGKILL when its parent goes away. Linux only; elsewhere a no-op.

A KeyboardInterrupt raised in the parent in the middle of such a map ends in a TimeoutError
traceback, in workers left running, or in a hang in the pool's shutdown; a Ctrl-C in a terminal
also interrupts the workers themselves. Inside `interrupts_deferred()` a Ctrl-C is raised when the
block ends, and forked workers ignore it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
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


@contextlib.contextmanager
def interrupts_deferred(notice: str) -> Iterator[None]:
    """A SIGINT inside this block prints `notice` and is raised as KeyboardInterrupt when the block
    ends; a second one is raised at once. Processes forked inside the block ignore SIGINT."""
    if threading.current_thread() is not threading.main_thread():  # only it may set signal handlers
        yield
        return
    owner, received = os.getpid(), False

    def on_sigint(signum, frame) -> None:
        nonlocal received
        if os.getpid() != owner:
            return  # a forked worker inherited this handler: its parent stops it
        if received:
            raise KeyboardInterrupt
        received = True
        print(notice, file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
