"""Is the checkpoint directory shared by all nodes? A node-local path (/tmp, local NVMe, a per-node
mount) passes every single-node check and only breaks at the first resume on another node, so the
nodes prove it with a marker-file handshake: every node runs the preflight at the same time with
the same --shared-id. Node 0 writes <dir>/.preflight/<id>.marker holding a random nonce; every
other node waits for it, then writes <id>.ack-<rank> with that nonce; node 0 waits for all acks
and writes <id>.done; the others wait for it and delete their acks; node 0 removes the marker and
done file. A node-local directory fails on both sides within the timeout (--shared-timeout)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .report import Report


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _wait(pred: Callable[[], bool], timeout: float, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


NODE_LOCAL_HINT = (
    "is it node-local storage (/tmp, local NVMe, a per-node mount)? Checkpoints must be on a filesystem all nodes mount"
)


@dataclass(frozen=True)
class _Handshake:
    """The handshake's files in <checkpoint dir>/.preflight for one --shared-id."""

    directory: Path
    shared_id: str

    @property
    def marker(self) -> Path:
        return self.directory / f"{self.shared_id}.marker"

    @property
    def done(self) -> Path:
        return self.directory / f"{self.shared_id}.done"

    def ack(self, rank: int) -> Path:
        return self.directory / f"{self.shared_id}.ack-{rank}"


def check_shared(rep: Report, ckpt: Path, *, shared_id: str, node_rank: int, nnodes: int, timeout: float) -> None:
    """Marker handshake through the checkpoint dir (see the module docstring)."""
    if nnodes == 1:
        rep.ok("checkpoint dir sharing: single node, not needed")
        return
    files = _Handshake(ckpt / ".preflight", shared_id)
    files.directory.mkdir(parents=True, exist_ok=True)
    if node_rank == 0:
        _lead(rep, ckpt, files, nnodes, timeout)
    else:
        _follow(rep, ckpt, files, node_rank, timeout)


def _lead(rep: Report, ckpt: Path, files: _Handshake, nnodes: int, timeout: float) -> None:
    """Node 0: write the marker, wait for every other node's ack of it, write done, then clean up."""
    others = range(1, nnodes)
    for stale in [files.marker, files.done, *(files.ack(r) for r in others)]:
        stale.unlink(missing_ok=True)
    nonce = secrets.token_hex(8)
    _write_atomic(files.marker, json.dumps({"nonce": nonce, "host": socket.gethostname()}))
    have = lambda: [r for r in others if (_read(files.ack(r)) or "").strip() == nonce]  # noqa: E731
    if not _wait(lambda: len(have()) == nnodes - 1, timeout):
        missing = sorted(set(others) - set(have()))
        rep.fail(
            f"checkpoint dir {ckpt} is not shared: node(s) {missing} did not acknowledge node 0's marker "
            f"{files.marker} within {timeout:g}s; {NODE_LOCAL_HINT} (or did those nodes not start the preflight?)"
        )
        files.marker.unlink(missing_ok=True)
        return
    _write_atomic(files.done, nonce)
    _clean_up(files, others, timeout)
    rep.ok(f"checkpoint dir {ckpt} is shared by all {nnodes} nodes")


def _clean_up(files: _Handshake, others: range, timeout: float) -> None:
    # The others delete their acks once they have seen `done`; then nothing is left behind.
    _wait(lambda: not any(files.ack(r).exists() for r in others), timeout)
    files.marker.unlink(missing_ok=True)
    files.done.unlink(missing_ok=True)
    try:
        files.directory.rmdir()  # only when empty: another launch may be using it
    except OSError:
        pass


def _follow(rep: Report, ckpt: Path, files: _Handshake, node_rank: int, timeout: float) -> None:
    """Every other node: ack each new marker's nonce until node 0's done file holds the acked one."""
    acked = {"nonce": None}

    def step() -> bool:
        nonce = _marker_nonce(files.marker)
        if nonce and nonce != acked["nonce"]:
            _write_atomic(files.ack(node_rank), nonce)
            acked["nonce"] = nonce
        return acked["nonce"] is not None and (_read(files.done) or "").strip() == acked["nonce"]

    if not _wait(step, timeout):
        seen = (
            "saw node 0's marker but not its completion"
            if acked["nonce"]
            else f"node 0's marker {files.marker} never appeared"
        )
        rep.fail(
            f"checkpoint dir {ckpt} is not shared (node {node_rank}): {seen} within {timeout:g}s; {NODE_LOCAL_HINT}"
        )
        return
    files.ack(node_rank).unlink(missing_ok=True)
    rep.ok(f"checkpoint dir {ckpt} is shared with node 0")


def _marker_nonce(marker: Path) -> str | None:
    """The nonce in node 0's marker; None while it is absent, empty or not yet readable JSON."""
    text = _read(marker)
    if not text:
        return None
    try:
        return json.loads(text)["nonce"]
    except (ValueError, KeyError, TypeError):
        return None
