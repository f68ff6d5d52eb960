"""Output directories of the data_prep tools: checked before any work, and only the tools' own
recorded files are ever deleted.

In a shard directory, data_prep.tokenize owns the manifest, the journal of an unfinished run, the
shard files one of those two records, and the temporary files of its own writes. A shard-named
file that no record lists belongs to someone else: the run stops and names it rather than delete
or overwrite it, with or without --overwrite.

A tool whose output is many files and no journal (data_prep.debian_corpus) builds it in a staging
directory (`staged`) and moves it into place when it is finished (`publish_staged`): a failed or
interrupted run leaves the output directory as it was. A run killed outright (SIGKILL, a node lost)
leaves the staging directory itself; the next run removes it (`remove_stale_staging`) when it holds only
the tool's own files and no live run holds its lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data_prep.atomic import TMP_NAME, TMP_SUFFIX, fsync_dir, remove_stale_tmp_files, tmp_path_for
from data_prep.shard_writer import JOURNAL_NAME, Journal
from retnet_train.data.manifest import MANIFEST_NAME

SHARD_NAME = re.compile(r"(train|validation)_\d{5,}\.bin")
LISTED_FILES = 5  # file names an error message spells out before "and N more"


class OutputDirError(ValueError):
    """An output path cannot be written, or holds files the tool did not record."""


def check_writable_dir(directory: Path) -> None:
    """Fail now, naming the path, if `directory` cannot be created or written (not hours later)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = "is not a directory" if existing == directory else f"cannot be created: {existing} is a file"
        raise OutputDirError(f"{directory}: {problem}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"{directory}: {existing} is not writable")


@contextlib.contextmanager
def removed_if_empty_on_failure(directory: Path) -> Iterator[None]:
    """The directories this creates (`directory` and missing parents) do not outlive a failed run
    that left nothing in them."""
    created = []
    path = directory
    while not path.exists() and path != path.parent:
        created.append(path)
        path = path.parent
    try:
        yield
    except BaseException:
        for path in created:  # deepest first; a non-empty one (a resumable journal) stays
            try:
                path.rmdir()
            except OSError:
                break
        raise


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """One writer per shard directory: a second tokenize into it stops instead of interleaving
    shards and journal lines. A flock on the directory itself, so a killed run leaves no lock."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirError(f"{directory}: another data_prep.tokenize is writing here") from None
        except OSError:
            pass  # a filesystem without flock (some NFS / Lustre mounts): run unguarded rather than not at all
        yield
    finally:
        os.close(fd)  # releases the lock


def owned_name(name: str) -> bool:
    return bool(SHARD_NAME.fullmatch(name)) or name in (MANIFEST_NAME, JOURNAL_NAME)


def manifest_files(directory: Path) -> set[str]:
    """Shard files the manifest lists, read leniently (a hand-edited manifest still names its files);
    an unreadable manifest names none."""
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        splits = data["splits"].values()
        return {s["file"] for split in splits for s in split["shards"] if SHARD_NAME.fullmatch(str(s["file"]))}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return set()


def unrecorded_shards(directory: Path, recorded: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if SHARD_NAME.fullmatch(p.name) and p.name not in recorded)


def check_shard_dir(directory: Path, overwrite: bool) -> set[str]:
    """Everything that can be known before a tokenize run starts (no file is touched): the path is
    writable, an existing output is replaced only with `overwrite`, and every shard-named file in it
    is recorded. Returns the recorded shard files."""
    check_writable_dir(directory)
    if not directory.exists():
        return set()
    manifest = directory / MANIFEST_NAME
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{manifest}: output already exists; pass --overwrite to rebuild it")
    by_manifest = manifest_files(directory)
    recorded = by_manifest | Journal(directory, fingerprint="").recorded_files()
    foreign = unrecorded_shards(directory, recorded)
    if foreign:
        listed = ", ".join(foreign[:LISTED_FILES])
        if len(foreign) > LISTED_FILES:
            listed += f" and {len(foreign) - LISTED_FILES} more"
        why = f" (its {MANIFEST_NAME} is unreadable)" if manifest.exists() and not by_manifest else ""
        raise OutputDirError(
            f"{directory}: holds shard files that no manifest or journal of data_prep.tokenize records{why}: "
            f"{listed}; they are never deleted: move them away or choose another --out"
        )
    return recorded


def prepare_shard_dir(directory: Path, overwrite: bool) -> None:
    """`check_shard_dir`, then with `overwrite` remove the previous output: the manifest, the journal
    and the shards they record, nothing else. Stale temporary files of the tool's own writes go too."""
    recorded = check_shard_dir(directory, overwrite)
    if overwrite:
        for name in sorted(recorded):
            (directory / name).unlink(missing_ok=True)
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        (directory / JOURNAL_NAME).unlink(missing_ok=True)
    remove_stale_tmp_files(directory, owned_name)


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new hidden directory on `out`'s filesystem to build the whole output in: beside `out` when it
    does not exist yet, else inside it (writing there needs no more access than writing `out`). It is
    removed with whatever is left in it however the block ends, and so are the parents created for it."""
    staging = _staging_path(out)
    with removed_if_empty_on_failure(staging.parent):
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        fd = os.open(staging, os.O_RDONLY)
        try:
            _try_lock(fd)  # held while this run lives: what tells a later run it is not a killed run's
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            os.close(fd)


def _staging_path(out: Path) -> Path:
    return tmp_path_for(out / "staging") if out.exists() else tmp_path_for(out)


def _try_lock(fd: int) -> bool | None:
    """flock(fd) without waiting: False when another open of the directory holds it, None on a filesystem
    without flock (some NFS / Lustre mounts)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def remove_stale_staging(out: Path, owned: Callable[[str], bool]) -> list[Path]:
    """Remove the staging directories that killed runs of `staged(out)` left (beside `out`, or inside it when
    it existed); returns them. One is removed only when it is a directory named as `staged` names it for
    `out`, everything in it is a file the tool writes (`owned(name)`, or a temporary file of one) and no live
    run holds its lock; anything else is left as it is."""
    places = [(out.parent, out.name)] + ([(out, "staging")] if out.is_dir() else [])
    stale = []
    for directory, name in places:
        for candidate in sorted(directory.glob(f".{name}.*{TMP_SUFFIX}")):
            match = TMP_NAME.fullmatch(candidate.name)
            if not match or match["name"] != name or candidate.is_symlink() or not candidate.is_dir():
                continue
            if all(_owned_file(p, owned) for p in candidate.iterdir()) and not _in_use(candidate, match["pid"]):
                shutil.rmtree(candidate)
                stale.append(candidate)
    return stale


def _owned_file(path: Path, owned: Callable[[str], bool]) -> bool:
    match = TMP_NAME.fullmatch(path.name)
    return path.is_file() and not path.is_symlink() and owned(match["name"] if match else path.name)


def _in_use(directory: Path, pid: str) -> bool:
    """Whether a live run writes `directory`: its lock, else (no flock here) a process `pid` on this host."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        locked = _try_lock(fd)
    finally:
        os.close(fd)  # releases the lock taken
    if locked is not None:
        return not locked
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # another user's process
    return True


def publish_staged(staging: Path, out: Path, last: str, replaced: Iterable[str] = ()) -> None:
    """Move a finished `staged` output into `out`. A new `out` appears whole in one rename; into an
    existing one the files move one by one, `last` (the file that marks a finished output) removed
    first and moved in last, after the previous output's `replaced` files are removed; nothing else
    in `out` is touched."""
    if staging.parent != out:
        os.replace(staging, out)
        fsync_dir(out.parent)
        return
    (out / last).unlink(missing_ok=True)  # until the new one is in, the output reads as unfinished
    for name in replaced:
        (out / name).unlink(missing_ok=True)
    for path in sorted(staging.iterdir()):
        if path.name != last:
            os.replace(path, out / path.name)
    os.replace(staging / last, out / last)
    fsync_dir(out)
