"""The loader must never be the bottleneck: no per-token Python. The Python calls it makes per batch do
not grow with the tokens in the batch (its rate on a machine: python -m data_prep.bench)."""

import sys

import numpy as np
from shard_fixtures import write_shard_dir

from retnet_train.data import TokenLoader


def python_calls_per_batch(shards, seq_len: int, batches: int = 3) -> list:
    loader = TokenLoader({"s": (str(shards), 1.0)}, seq_len=seq_len, micro_batch_size=8, seed=0)
    next(loader)  # opening the shards is not per batch
    counts = []
    for _ in range(batches):
        n = [0]

        def count(frame, event, arg, n=n):
            n[0] += event in ("call", "c_call")

        sys.setprofile(count)
        try:
            next(loader)
        finally:
            sys.setprofile(None)
        counts.append(n[0])
    return counts


def test_python_work_per_batch_does_not_grow_with_its_tokens(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 8192, size=400_000)
    tokens[rng.random(tokens.size) < 1e-3] = 2
    write_shard_dir(tmp_path / "s", tokens, shard_tokens=1 << 16, vocab_size=8192)
    short, long = python_calls_per_batch(tmp_path / "s", 128), python_calls_per_batch(tmp_path / "s", 2048)
    # 16x the tokens per batch (1,024 -> 16,384): about the same calls, far fewer than tokens
    assert max(long) <= 1.5 * max(short) and max(long) < 8 * 2048 // 10, (short, long)
