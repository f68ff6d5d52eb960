"""Index-computable pseudo-random permutations (a Feistel network with cycle walking).

The loader needs "position i of epoch e of source s" -> window index, for arbitrary i (resume,
rank striding) and for sources with billions of windows, so materializing np.random.permutation(n)
(8 bytes per window, per epoch) is avoided: permute(i, n, key) is a bijection on [0, n) computed
on the fly, vectorized over i.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 4


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 mixer; uint64 array arithmetic wraps (as intended) without warnings."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def derive_key(*parts: int | str) -> int:
    """A 64-bit key from (seed, source name, epoch, ...): stable across processes and Python
    versions (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _round_keys(key: int) -> np.ndarray:
    return splitmix64(np.uint64(key) + np.arange(1, ROUNDS + 1, dtype=np.uint64))


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """Image of `index` (ints in [0, n)) under the permutation of [0, n) chosen by `key`."""
    index = np.asarray(index, dtype=np.int64)
    if n < 1:
        raise ValueError(f"permutation size must be >= 1, got {n}")
    if index.size and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"indices must lie in [0, {n})")
    if n == 1:
        return np.zeros_like(index)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)  # domain 4**half is < 4n: few walks
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = _round_keys(key)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (splitmix64(right ^ k) & mask)
        return (left << shift) | right

    x = feistel(index.astype(np.uint64))
    # cycle walking: re-apply until the value falls inside [0, n) (keeps it a bijection)
    outside = x >= np.uint64(n)
    while outside.any():
        x[outside] = feistel(x[outside])
        outside = x >= np.uint64(n)
    return x.astype(np.int64)
