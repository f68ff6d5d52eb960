"""The loader must never be the bottleneck: >= 100x one GPU's ~50k tokens/s, with no per-token Python."""

import time

import numpy as np
from shard_fixtures import write_shard_dir

from retnet_train.data import TokenLoader

TARGET_TOKENS_PER_S = 5_000_000


def test_loader_throughput(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 8192, size=4_000_000)
    tokens[rng.random(tokens.size) < 1e-3] = 2
    write_shard_dir(tmp_path / "s", tokens, shard_tokens=1 << 20, vocab_size=8192)
    loader = TokenLoader({"s": (str(tmp_path / "s"), 1.0)}, seq_len=2048, micro_batch_size=8, seed=0)
    next(loader)  # page in / warm up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        n += next(loader)["input_ids"].numel()
    rate = n / (time.perf_counter() - start)
    assert rate >= TARGET_TOKENS_PER_S, f"{rate / 1e6:.1f}M tokens/s"
