"""Ending a process that ran Gloo collectives with its own exit status.

Gloo's worker threads outlive destroy_process_group while anything still references the group
(DeepSpeed keeps it, in default arguments among others), and one may still be releasing the tensors
of the last collective when the interpreter tears down: it needs the GIL then, and the process
aborts ("terminate called without an active exception", status -6 instead of its own). An entry
point calls `end_before_teardown()` first and leaves through `exit_with(status)`: the process ends
once the exit handlers registered after that first call have run (torch's, multiprocessing's,
weakref finalizers), without the interpreter's teardown."""

from __future__ import annotations

import atexit
import logging
import os
import sys

_status: int | None = None  # set by exit_with()


def end_before_teardown() -> None:
    """Register the end; call it before importing torch, so that torch's exit handlers run before it."""
    atexit.register(_end)  # exit handlers run last-registered first


def exit_with(status: int) -> None:
    global _status
    _status = status
    sys.exit(status)


def _end() -> None:
    if _status is not None:
        logging.shutdown()  # (its exit handler, registered before this one, would not run)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status)
