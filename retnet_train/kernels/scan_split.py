"""How the `triton` backend's forward state scan splits a sequence's chunks into segments that run side
by side (triton_retention._states). Plain Python, no triton import: the byte model of the kernels'
passes (bench/retention_traffic.py) counts the same segments, and its CPU test runs without triton."""

from __future__ import annotations


def scan_split(chunks: int, segments: int) -> tuple[int, int]:
    """(chunks per segment, segments) for `chunks` chunks asked into `segments` segments (the count from
    triton_retention_launch.scan_segments): every segment but the last takes ceil(chunks / segments)
    chunks, and a count that would leave a segment empty shrinks (5 chunks asked into 4: 2 per
    segment, 3 segments)."""
    per_segment = -(-chunks // segments)
    return per_segment, -(-chunks // per_segment)
