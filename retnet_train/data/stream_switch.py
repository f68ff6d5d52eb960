"""Switching a resumed run to another data stream (data.on_change=switch): where each source starts.

A stream is a pure function of its sources, weights, seq_len and seed (loader.py), so the windows the
checkpoint's stream read of each source follow from its saved weights and sequence count alone. A
source that the new stream reads again, with the same data and windowing, continues its own order
after those windows (the rest of its epoch first, then the next epochs): nothing is read twice before
its epoch ends. Any other source starts at its beginning.
"""

from __future__ import annotations

from typing import Any, Mapping

from retnet_train.data.mixing import MixingSchedule, mix_of


def windows_read(weights: Mapping[str, float], consumed: int) -> dict[str, int]:
    """Windows of each source that global sequences 0 .. consumed - 1 of a stream mixed by `weights` read."""
    return MixingSchedule(weights).taken(consumed)


def continued_offsets(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> dict[str, int]:
    """Windows of each source of the new stream (`mine`, its loader state) read before it: for a source
    the saved stream also read, with the same data, window count, seq_len and seed, what it had read
    before (its own offset) plus what the saved stream read of it; 0 for the others."""
    weights = saved.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"loader state key 'weights' must map source names to weights, got {weights!r}")
    read = windows_read({name: float(w) for name, w in weights.items()}, saved["consumed_sequences"])
    earlier, theirs = saved.get("offsets") or {}, saved.get("sources") or {}
    same_windowing = all(saved.get(key) == mine[key] for key in ("seq_len", "seed"))

    def continues(name: str) -> bool:
        return (
            same_windowing
            and name in theirs
            and not _other_data(theirs[name], mine["sources"][name])
            and (saved.get("windows") or {}).get(name) == mine["windows"][name]
        )

    return {name: int(earlier.get(name, 0)) + read.get(name, 0) if continues(name) else 0 for name in mine["sources"]}


def switch_note(saved: Mapping[str, Any], mine: Mapping[str, Any], offsets: Mapping[str, int]) -> str:
    """The console line of a switch, from the saved and the new loader state: what changed and where
    each source starts."""
    return (
        f"data.on_change=switch: a new data stream from this step ({'; '.join(stream_changes(saved, mine))}); "
        f"each source starts {', '.join(_starts(offsets, mine['windows']))}"
    )


def stream_changes(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> list[str]:
    """What differs between two loader states' streams, in the config's terms."""
    theirs, ours = saved.get("sources") or {}, mine["sources"]
    changes = [f"source {name!r} added" for name in ours if name not in theirs]
    changes += [f"source {name!r} dropped" for name in theirs if name not in ours]
    changes += [
        f"source {name!r} holds other data" for name in ours if name in theirs and _other_data(theirs[name], ours[name])
    ]
    old_weights = {name: float(w) for name, w in (saved.get("weights") or {}).items()}
    if mix_of(old_weights) != mix_of(mine["weights"]):
        changes.append(f"weights {shares(old_weights)} -> {shares(mine['weights'])}")
    changes += [
        f"data.{key} {saved.get(key)} -> {mine[key]}" for key in ("seq_len", "seed") if saved.get(key) != mine[key]
    ]
    return changes or ["other windows"]


def _other_data(theirs: Any, ours: Mapping[str, str]) -> bool:
    return not isinstance(theirs, Mapping) or theirs.get("digest") != ours["digest"]


def shares(weights: Mapping[str, float]) -> str:
    """A mix as each source's share: "a 0.6, b 0.4"."""
    total = sum(weights.values()) or 1.0
    return ", ".join(f"{name} {w / total:.3g}" for name, w in sorted(weights.items()))


def _starts(offsets: Mapping[str, int], windows: Mapping[str, int]) -> list[str]:
    starts = []
    for name in sorted(offsets):
        epoch, window = divmod(offsets[name], windows[name])
        where = f"at window {window:,} of {windows[name]:,}, epoch {epoch}" if offsets[name] else "at its beginning"
        starts.append(f"{name} {where}")
    return starts
