"""Processes from /proc, for tests that signal or kill a whole job: torchrun's workers run in sessions of
their own, out of reach of a signal to the launcher's process group, and worker pools must die with
their parent."""

from __future__ import annotations

from pathlib import Path


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone since the listing
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def children(pid: int) -> list[int]:
    return _children_by_parent().get(pid, [])


def descendants(pid: int) -> list[int]:
    by_parent = _children_by_parent()
    out, todo = [], [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def running(pid: int) -> bool:
    """Not exited: a zombie has exited, its parent just has not reaped it yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
