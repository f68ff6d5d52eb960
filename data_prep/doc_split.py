"""Train/validation assignment per document: a hash of (seed, document index).

A hash rather than a random stream so that the answer for document i does not depend on how the
corpus is chunked, on num_proc, or on where a resumed run restarts.
"""

from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, vectorized (uint64 arithmetic wraps, which is what it wants)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def validation_mask(doc_indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for documents that go to the validation split (expected share: `fraction`)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    key = splitmix64(np.asarray([seed], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = splitmix64(np.asarray(doc_indices, dtype=np.uint64) ^ key)
    # top 53 bits -> uniform float in [0, 1)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) < fraction
