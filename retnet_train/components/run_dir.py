"""The directories a run writes: checked at start, owned by one live trainer, and an earlier run's
metrics kept apart from this run's.

* Every directory the run will write (run.dir, checkpoint.dir, the profile dir) must be creatable and
  writable at start, so that a bad path fails before any training, naming its key.
* `<dir>/trainer.lock` in run.dir and in checkpoint.dir is held with flock(2) by the trainer that uses
  them: a second trainer on either is refused, naming the holder. The kernel drops the lock when the
  holder ends, however it ends, so a crashed run leaves nothing stuck.
* A run that does not continue this directory's own checkpoints (a fresh start, or a resume from
  another run's checkpoint) finding metrics.jsonl there renames it to metrics.<n>.jsonl (n = 1, 2, ...
  in the order they were set aside) instead of appending to it, and that run's config.yaml to config.<n>.yaml.
* Rank 0 writes the resolved config to <run.dir>/config.yaml at start. A run that continues its own
  checkpoints with another config (a raised train.max_steps, another lr) first renames the config.yaml
  it replaces to config.until_step_<N>.yaml (N: the step resumed from).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
import time
from typing import List, Optional

from omegaconf import OmegaConf

LOCK_NAME = "trainer.lock"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


def write_problem(key: str, path: str) -> Optional[str]:
    """Why the run could not create or write directory `path` (set by config key `key`), or None."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is" if existing == path else f"lies under {existing}, which is"
        return f"{key}: {path} {where} a file, not a directory"
    try:  # what the run will do there (os.access says yes to root on a read-only mount)
        with tempfile.TemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as e:
        return f"{key}: cannot write {path} (creating a file in {existing} failed: {e.strerror})"
    return None


def same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def claim_dirs(
    run_dir: str, checkpoint_dir: str, profile_dir: Optional[str], is_main: bool, locks: List["DirLock"]
) -> Optional[str]:
    """The first problem with the directories this rank will write, or None: each must be writable
    (profile_dir: None when this rank profiles nothing), and rank 0 locks run.dir and checkpoint.dir
    against a second trainer. Each lock taken is appended to `locks` at once, so that the caller
    releases it also when a later one fails."""
    writes = [("run.dir", run_dir)] if is_main else []
    writes.append(("checkpoint.dir", checkpoint_dir))  # every rank writes its shards and RNG state there
    if profile_dir is not None:
        writes.append(("profile.enabled", profile_dir))
    problem = next(filter(None, (write_problem(key, path) for key, path in writes)), None)
    if problem is None and is_main:
        # both: another run's checkpoint.dir may point into this run.dir, or the other way round
        owned = [("run.dir", run_dir), ("checkpoint.dir", checkpoint_dir)]
        for key, path in owned[:1] if same_dir(run_dir, checkpoint_dir) else owned:
            lock = DirLock(path, key)
            locks.append(lock)
            problem = lock.acquire()
            if problem:
                break
    return problem


class DirLock:
    """An exclusive flock on <directory>/trainer.lock for the life of a trainer."""

    def __init__(self, directory: str, key: str):
        self.dir, self.key = os.path.abspath(directory), key
        self.path = os.path.join(self.dir, LOCK_NAME)
        self._fd: Optional[int] = None
        self._made_dir = False

    def acquire(self) -> Optional[str]:
        """Take the lock; returns why it is not ours (another live trainer holds it), else None."""
        self._made_dir = not os.path.isdir(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return self._in_use(holder)
            print(
                f"warning: {self.path}: no file locks on this filesystem ({e.strerror}): "
                f"a second trainer on {self.key}={self.dir} would not be noticed",
                flush=True,
            )
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return None

    def probe(self) -> Optional[str]:
        """Why acquire() would fail now (a live trainer holds the lock), else None; takes nothing and
        creates nothing (the preflight's check)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None  # no lock file: no trainer has run here
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None  # no file locks on this filesystem: the trainer warns
            return self._in_use(_holder(fd))
        finally:
            os.close(fd)  # closing releases a lock taken here
        return None

    def _in_use(self, holder: str) -> str:
        return (
            f"{self.key}={self.dir} is in use by another trainer ({holder}; {self.path}): "
            f"wait for it to end or stop it, or give this run another {self.key}"
        )

    def release(self) -> None:
        """Give the lock back; a directory this trainer created and left holding only the lock file
        (a run that failed at start) is removed again."""
        if self._fd is None:
            return
        if self._made_dir and os.listdir(self.dir) == [LOCK_NAME]:
            os.remove(self.path)
            os.rmdir(self.dir)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _holder(fd: int) -> str:
    """Who holds a lock, as its holder wrote it into the lock file."""
    return os.read(fd, 200).decode(errors="replace").strip() or "unknown process"


def set_aside_metrics(run_dir: str) -> Optional[str]:
    """Rename an earlier run's metrics.jsonl to the first free metrics.<n>.jsonl, and the config.yaml that
    describes it to config.<n>.yaml (this run writes its own); returns the new metrics path."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return None
    n = 1
    while any(os.path.exists(os.path.join(run_dir, name)) for name in (f"metrics.{n}.jsonl", f"config.{n}.yaml")):
        n += 1
    target = os.path.join(run_dir, f"metrics.{n}.jsonl")
    os.rename(path, target)
    if os.path.isfile(os.path.join(run_dir, CONFIG)):
        os.rename(os.path.join(run_dir, CONFIG), os.path.join(run_dir, f"config.{n}.yaml"))
    return target


def same_path(a: Optional[str], b: Optional[str]) -> bool:
    """Both name the same place (relative paths from the launch directory); None is no place."""
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


def continues_run(checkpoint_dir: str, resumed_from: Optional[str]) -> bool:
    """Whether this run goes on from its own checkpoints (resumed_from: the directory of the checkpoint
    resumed, or None), not from another run's or from scratch: its metrics and W&B run carry on."""
    return same_path(resumed_from, checkpoint_dir)


def open_run_dir(run_dir: str, checkpoint_dir: str, resumed_from: Optional[str], resolved: dict, step: int = 0) -> None:
    """Rank 0 at start: create run.dir, set an earlier run's metrics aside unless this run continues the
    checkpoints of checkpoint_dir (resumed_from: the directory of the checkpoint resumed, or None; step:
    the step it resumed at), and write config.yaml."""
    os.makedirs(run_dir, exist_ok=True)
    if continues_run(checkpoint_dir, resumed_from):
        kept = set_aside_changed_config(run_dir, resolved, step)
        if kept:
            print(f"the config differs from the one this run started with: that one is kept as {kept}", flush=True)
    else:
        moved = set_aside_metrics(run_dir)
        if moved:
            print(
                f"{run_dir} holds metrics of an earlier run without its checkpoints: kept as {moved} (its "
                f"config.yaml beside them, numbered alike); this run logs to a new metrics.jsonl",
                flush=True,
            )
    OmegaConf.save(OmegaConf.create(resolved), os.path.join(run_dir, CONFIG))


def set_aside_changed_config(run_dir: str, resolved: dict, step: int) -> Optional[str]:
    """Rename config.yaml to the first free config.until_step_<step>[.<n>].yaml when it differs from
    `resolved` (the metrics up to `step` were logged under it); returns the new path, or None."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path) or OmegaConf.to_container(OmegaConf.load(path)) == resolved:
        return None
    target, n = os.path.join(run_dir, f"config.until_step_{step}.yaml"), 1
    while os.path.exists(target):
        target, n = os.path.join(run_dir, f"config.until_step_{step}.{n}.yaml"), n + 1
    os.rename(path, target)
    return target
