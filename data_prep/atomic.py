"""Atomic file writes: readers see the old file or the complete new one, never a half-written one.

A killed run must not leave a truncated shard or manifest under its final name, so everything is
written to a temporary name in the same directory (same filesystem, so rename is atomic), fsynced,
then renamed over.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: Path) -> Path:
    # pid in the name: two concurrent writers never clobber each other's temporary file
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    # makes the rename itself durable; not supported on every platform/filesystem
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(
    path: str | os.PathLike, data: bytes | memoryview, before_rename: Callable[[], None] | None = None
) -> None:
    """`before_rename` runs once the data is durable under the temporary name: a file that must be
    recorded before it appears (see shard_writer's journal) is recorded there."""
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


TMP_NAME = re.compile(rf"\.(?P<name>.+)\.(?P<pid>\d+){re.escape(TMP_SUFFIX)}")  # tmp_path_for's names


def remove_stale_tmp_files(directory: Path, owned: Callable[[str], bool]) -> None:
    """Temporary files of a killed writer are garbage by construction (never renamed); only those
    of files the caller owns (`owned(final name)`) are removed, never someone else's `.x.tmp`."""
    for stale in directory.glob(f".*{TMP_SUFFIX}"):
        match = TMP_NAME.fullmatch(stale.name)
        if match and owned(match["name"]) and stale.is_file():
            stale.unlink()
