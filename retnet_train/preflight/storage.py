"""The checkpoint directory as this node sees it: writable (a probe file written, fsynced, read
back and removed) and with room for the checkpoints. Size: 16 bytes per parameter (bf16 weights 2
+ fp32 master weights 4 + Adam's two fp32 moments 8, rounded up for metadata and the data loader
state), times the checkpoints on disk at once (default 2: a new checkpoint is written before the
previous one is removed). Whether other nodes see the same directory is shared_dir.py's job."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
from pathlib import Path

from .report import Report, human_bytes

BYTES_PER_PARAM = 16


@contextlib.contextmanager
def leaving_no_new_dirs(path: Path, enabled: bool = True):
    """Remove again, when empty, the directories on the way to `path` that did not exist before (the checks
    create the checkpoint dir to probe it; a dry run or a failed preflight would leave it behind). Off on
    several nodes: another node may be probing the shared directory at that moment."""
    missing = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        yield
    finally:
        for directory in missing if enabled else []:
            try:
                directory.rmdir()
            except OSError:  # not empty (or not ours to remove): keep it and everything above it
                break


def check_writable(rep: Report, ckpt: Path) -> bool:
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        probe = ckpt / f".preflight-write-{socket.gethostname()}-{os.getpid()}"
        data = secrets.token_bytes(4096)
        with open(probe, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        ok = probe.read_bytes() == data
        probe.unlink()
    except OSError as exc:
        rep.fail(
            f"checkpoint dir {ckpt} is not writable: {exc.strerror or exc} "
            f"({errno.errorcode.get(exc.errno, exc.errno)})"
        )
        return False
    if not ok:
        rep.fail(f"checkpoint dir {ckpt}: a file written there reads back different")
        return False
    rep.ok(f"checkpoint dir {ckpt} is writable")
    return True


def check_disk(rep: Report, ckpt: Path, params: int | None, keep: int, source: str) -> None:
    if params is None:
        rep.warn("free-space check skipped: no --params, --model-preset or model=... override")
        return
    need = params * BYTES_PER_PARAM * keep
    free = shutil.disk_usage(ckpt).free
    count = f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.3g}M"
    what = (
        f"{count} params ({source}) x {BYTES_PER_PARAM} B/param x {keep} checkpoint(s) "
        f"= {human_bytes(need)}; free on {ckpt}: {human_bytes(free)}"
    )
    if free < need:
        rep.fail("not enough disk for checkpoints: " + what)
    else:
        rep.ok("disk: " + what)
