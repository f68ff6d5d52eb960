"""Deterministic multi-source mixing: global sequence g -> (source, index within that source).

The weights are rounded to integer counts per period of P sequences (largest remainder), and a
period is laid out by smooth weighted round-robin, so every prefix of the schedule is within about
one sequence per source of its target share (no sampling noise), and the map is O(1) for any g:
no replay from 0 is needed on resume or for rank striding.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

DEFAULT_PERIOD = 1 << 14  # weight resolution 1/16384


class MixingSchedule:
    def __init__(self, weights: Mapping[str, float], period: int = DEFAULT_PERIOD):
        if not weights:
            raise ValueError("no data sources given")
        self.names = sorted(weights)
        w = np.array([float(weights[n]) for n in self.names])
        for name, value in zip(self.names, w):
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"data source {name!r}: weight must be a positive number, got {weights[name]!r}")
        exact = w / w.sum() * period
        counts = np.floor(exact).astype(np.int64)
        # largest remainder; ties go to the earlier name (stable sort), so the rounding is deterministic
        for i in np.argsort(-(exact - counts), kind="stable")[: period - counts.sum()]:
            counts[i] += 1
        for name, c in zip(self.names, counts):
            if c == 0:
                raise ValueError(f"data source {name!r}: weight {weights[name]} is below the 1/{period} resolution")
        self.period, self.counts = period, counts
        self.block, self.rank_in_block = self._layout(counts.tolist(), period)

    @staticmethod
    def _layout(counts: list[int], period: int) -> tuple[np.ndarray, np.ndarray]:
        current = [0] * len(counts)
        seen = [0] * len(counts)
        block = np.empty(period, dtype=np.int64)
        rank = np.empty(period, dtype=np.int64)
        for step in range(period):
            for i, c in enumerate(counts):
                current[i] += c
            best = max(range(len(counts)), key=current.__getitem__)  # first max: deterministic
            current[best] -= period
            block[step], rank[step] = best, seen[best]
            seen[best] += 1
        return block, rank

    def taken(self, consumed: int) -> dict[str, int]:
        """name -> sequences of that source among global sequences 0 .. consumed - 1."""
        cycles, rest = divmod(int(consumed), self.period)
        counts = cycles * self.counts + np.bincount(self.block[:rest], minlength=len(self.names))
        return dict(zip(self.names, counts.tolist()))

    def assign(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global sequence indices g: (source position in self.names, index within source)."""
        g = np.asarray(g, dtype=np.int64)
        cycle, pos = np.divmod(g, self.period)
        source = self.block[pos]
        return source, cycle * self.counts[source] + self.rank_in_block[pos]


def mix_of(weights: Any) -> dict[str, int] | None:
    """name -> sequences per period of the schedule `weights` give: what defines the mix, so that weights
    of another scale ([0.6, 0.4], [3, 2]) are the same one; None for weights no schedule takes."""
    try:
        schedule = MixingSchedule({str(name): float(w) for name, w in weights.items()})
    except (AttributeError, TypeError, ValueError):
        return None
    return dict(zip(schedule.names, schedule.counts.tolist()))
