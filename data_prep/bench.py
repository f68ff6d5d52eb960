"""Throughput of the data path on this machine: tokenization (tokens/s) and the loader (tokens/s).

    python -m data_prep.bench [--data data/sample] [--num-proc N] [--seq-len 2048] [--batch 8]

Uses the sample corpus (`make data`; built if missing). Each rate is printed beside the rate it
should reach: tokenization 1M tokens/s on 2 cores; the loader 100x what one GPU trains on
(~50k tokens/s), i.e. 5M tokens/s, so it never holds a GPU back.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

from data_prep.cli import command_parser
from data_prep.sample_corpus import build_sample, stdlib_source_files
from data_prep.sources import Source
from data_prep.tokenize import tokenize_source
from data_prep.tokenizer_card import load_tokenizer
from retnet_train.data import TokenLoader, read_manifest

LOADER_TARGET = 5_000_000
TOKENIZE_TARGET = 1_000_000


def bench_tokenize(model: Path, num_proc: int, max_bytes: int) -> float:
    tok = load_tokenizer(model)
    files = stdlib_source_files(max_bytes)
    source = Source("bench", "stdlib", files)
    with tempfile.TemporaryDirectory() as tmp:
        tokenize_source(source, tok, Path(tmp) / "warm", num_proc=num_proc, progress=False)  # datasets' load cache
        start = time.perf_counter()
        m = tokenize_source(source, tok, Path(tmp) / "out", num_proc=num_proc, progress=False)
        seconds = time.perf_counter() - start
    tokens = sum(s.tokens for s in m.splits.values())
    rate = tokens / seconds
    print(
        f"tokenize: {tokens:,} tokens from {len(files)} files in {seconds:.2f}s with num_proc={num_proc}: "
        f"{rate / 1e6:.2f}M tokens/s (target >= {TOKENIZE_TARGET / 1e6:.0f}M)"
    )
    return rate


def bench_loader(shards: Path, seq_len: int, batch: int, seconds: float = 3.0) -> float:
    manifest = read_manifest(shards)
    loader = TokenLoader({"sample": (str(shards), 1.0)}, seq_len, batch, seed=0, vocab_size=manifest.vocab_size)
    next(loader)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(loader)["input_ids"].numel()
    rate = tokens / (time.perf_counter() - start)
    print(
        f"loader:   seq_len {seq_len} x batch {batch}: {rate / 1e6:.1f}M tokens/s "
        f"(target >= {LOADER_TARGET / 1e6:.0f}M = 100x one GPU)"
    )
    return rate


def main(argv: Sequence[str] | None = None) -> None:
    p = command_parser("bench", __doc__)
    p.add_argument(
        "--data", default="data/sample", type=Path, help="the sample corpus, built if missing (default: %(default)s)"
    )
    p.add_argument(
        "--num-proc", type=int, default=os.cpu_count(), help="tokenize workers (default: one per CPU, %(default)s here)"
    )
    p.add_argument("--max-bytes", type=int, default=16_000_000, help="bytes of source tokenized (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=2048, help="the loader's sequence length (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="the loader's micro-batch (default: %(default)s)")
    a = p.parse_args(argv)
    build_sample(a.data, progress=False)
    bench_tokenize(a.data / "tokenizer.model", a.num_proc, a.max_bytes)
    bench_loader(a.data / "shards", a.seq_len, a.batch)


if __name__ == "__main__":
    main()
