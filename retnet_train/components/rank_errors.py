"""Errors every rank stops on with the same message are printed once, by rank 0.

A launch of N ranks that fails at start would otherwise print the same error N times. What every rank
is known to share: a problem with the config (a function of the command line, the same on every rank),
and what a collective handed every rank (raise_first_problem, distributed.on_every_rank: a SharedError).
Anything else (a rank's own files, its device) is printed in full by the rank that met it.
"""

from __future__ import annotations

import os
import sys
import time

RANK_0_GRACE_S = 5.0  # longest a rank waits for rank 0 to fail first (torchrun then stops it at once)


class SharedError(Exception):
    """An error every rank of the run raises with this same message: rank 0 alone prints it."""


class SameOnEveryRank(SharedError, ValueError):
    """A refusal every rank of the run raises with this same message."""


class FailedOnRanks(SharedError, RuntimeError):
    """What failed on some ranks (not a refusal), handed to every rank by a collective (distributed.on_every_rank)."""


def process_rank() -> int:
    """This process's rank as its launcher set it (0 when run alone)."""
    return int(os.environ.get("RANK", 0))


def print_error(error: Exception, rank: int) -> None:
    """`error: ...` on stderr; a SharedError on a rank other than 0 only points at rank 0's."""
    if rank == 0 or not isinstance(error, SharedError) or not wait_for_rank_0():
        # (no stop signal in time: rank 0 may be slow or gone; printing it again loses nothing)
        print(f"error: {error}", file=sys.stderr, flush=True)
        return
    print(f"error: rank {rank}: the same error as rank 0, which prints it", file=sys.stderr, flush=True)


def wait_for_rank_0(timeout: float = RANK_0_GRACE_S) -> bool:
    """Until a stop signal (True) or `timeout` (False). torchrun and DeepSpeed's launcher stop every rank
    once one has exited: a rank leaving first could stop rank 0 before its stop handler is installed,
    and the message with it. Leaving after rank 0 (which brings that signal) keeps it."""
    from .preemption import PreemptionHandler

    stop = PreemptionHandler()  # takes over a signal the entry point's handler recorded
    deadline = time.monotonic() + timeout
    try:
        while not stop.received and time.monotonic() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:
        return True  # Ctrl-C reached every rank, rank 0 too
    finally:
        stop.restore()
    return bool(stop.received)
