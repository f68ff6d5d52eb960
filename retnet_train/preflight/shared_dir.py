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


def check_shared(rep: Report, ckpt: Path, *, shared_id: str, node_rank: int, nnodes: int, timeout: float) -> None:
    """Marker handshake through the checkpoint dir (see the module docstring)."""
    if nnodes == 1:
        rep.ok("checkpoint dir sharing: single node, not needed")
        return
    d = ckpt / ".preflight"
    d.mkdir(parents=True, exist_ok=True)
    marker, done = d / f"{shared_id}.marker", d / f"{shared_id}.done"
    ack = lambda r: d / f"{shared_id}.ack-{r}"  # noqa: E731
    hint = (
        "is it node-local storage (/tmp, local NVMe, a per-node mount)? "
        "Checkpoints must be on a filesystem all nodes mount"
    )
    if node_rank == 0:
        for stale in [marker, done, *(ack(r) for r in range(1, nnodes))]:
            stale.unlink(missing_ok=True)
        nonce = secrets.token_hex(8)
        _write_atomic(marker, json.dumps({"nonce": nonce, "host": socket.gethostname()}))
        have = lambda: [r for r in range(1, nnodes) if (_read(ack(r)) or "").strip() == nonce]  # noqa: E731
        if not _wait(lambda: len(have()) == nnodes - 1, timeout):
            missing = sorted(set(range(1, nnodes)) - set(have()))
            rep.fail(
                f"checkpoint dir {ckpt} is not shared: node(s) {missing} did not acknowledge node 0's marker "
                f"{marker} within {timeout:g}s; {hint} (or did those nodes not start the preflight?)"
            )
            marker.unlink(missing_ok=True)
            return
        _write_atomic(done, nonce)
        # The others delete their acks once they have seen `done`; then nothing is left behind.
        _wait(lambda: not any(ack(r).exists() for r in range(1, nnodes)), timeout)
        marker.unlink(missing_ok=True)
        done.unlink(missing_ok=True)
        try:
            d.rmdir()  # only when empty: another launch may be using it
        except OSError:
            pass
        rep.ok(f"checkpoint dir {ckpt} is shared by all {nnodes} nodes")
        return
    acked = {"nonce": None}

    def step() -> bool:
        text = _read(marker)
        if text:
            try:
                nonce = json.loads(text)["nonce"]
            except (ValueError, KeyError, TypeError):
                nonce = None
            if nonce and nonce != acked["nonce"]:
                _write_atomic(ack(node_rank), nonce)
                acked["nonce"] = nonce
        return acked["nonce"] is not None and (_read(done) or "").strip() == acked["nonce"]

    if not _wait(step, timeout):
        seen = (
            "saw node 0's marker but not its completion"
            if acked["nonce"]
            else f"node 0's marker {marker} never appeared"
        )
        rep.fail(f"checkpoint dir {ckpt} is not shared (node {node_rank}): {seen} within {timeout:g}s; {hint}")
        return
    ack(node_rank).unlink(missing_ok=True)
    rep.ok(f"checkpoint dir {ckpt} is shared with node 0")
