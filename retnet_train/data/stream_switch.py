"""Switching a resumed run to another data stream (data.on_change=switch): where each source starts.

A stream is a pure function of its sources, weights, seq_len and seed (loader.py), so the windows the
checkpoint's stream read of each source follow from its saved weights and sequence count alone. A
source that the new stream reads again, with the same data and windowing, continues its own order
after those windows (the rest of its epoch first, then the next epochs): nothing is read twice before
its epoch ends. Any other source starts at its beginning.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from retnet_train.data.mixing import MixingSchedule


def windows_read(weights: Mapping[str, float], consumed: int) -> dict[str, int]:
    """Windows of each source that global sequences 0 .. consumed - 1 of a stream mixed by `weights` read."""
    schedule = MixingSchedule(weights)
    cycles, rest = divmod(int(consumed), schedule.period)
    counts = cycles * schedule.counts + np.bincount(schedule.block[:rest], minlength=len(schedule.names))
    return dict(zip(schedule.names, counts.tolist()))


def continued_offsets(
    saved: Mapping[str, Any], digests: Mapping[str, str], windows: Mapping[str, int], seq_len: int, seed: int
) -> dict[str, int]:
    """Windows of each source of the new stream (name -> data digest, name -> windows) read before it:
    for a source the saved stream also read, with the same digest, window count, seq_len and seed,
    what it had read before (its own offset) plus what the saved stream read of it; 0 for the others."""
    weights = saved.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"loader state key 'weights' must map source names to weights, got {weights!r}")
    read = windows_read({name: float(w) for name, w in weights.items()}, saved["consumed_sequences"])
    earlier = saved.get("offsets") or {}
    same_windowing = saved.get("seq_len") == seq_len and saved.get("seed") == seed
    offsets = {}
    for name, digest in digests.items():
        source = (saved.get("sources") or {}).get(name)
        same = (
            same_windowing
            and isinstance(source, Mapping)
            and source.get("digest") == digest
            and (saved.get("windows") or {}).get(name) == windows[name]
        )
        offsets[name] = int(earlier.get(name, 0)) + read.get(name, 0) if same else 0
    return offsets


def switch_note(changes: list[str], offsets: Mapping[str, int], windows: Mapping[str, int]) -> str:
    """The console line of a switch: what changed and where each source starts."""
    starts = []
    for name in sorted(offsets):
        epoch, window = divmod(offsets[name], windows[name])
        where = f"window {window:,} of {windows[name]:,}, epoch {epoch}" if offsets[name] else "its beginning"
        starts.append(f"{name} at {where}")
    return (
        f"data.on_change=switch: the data stream changed since the checkpoint ({'; '.join(changes)}); a new stream "
        f"starts here, each source where the checkpoint's left it: {', '.join(starts)}"
    )
