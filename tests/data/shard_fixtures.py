"""Synthetic shard directories for loader tests, written in the manifest format directly.

Token values encode their stream position (token = position + FIRST_ID, EOS at chosen places), so
a test can tell exactly which window of which source a sequence came from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from retnet_train.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo

EOS = 2
FIRST_ID = 10
VOCAB = 1 << 20  # uint32 shards: room for position-coded tokens
TOKENIZER_SHA = "ab" * 32


def learnable_tokens(n: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """A corpus a tiny model learns in a few steps: token t+1 = (3 t + noise) mod (V - 10) + 10, and
    EOS (id 2) at ~1 in 50 positions."""
    rng = np.random.default_rng(seed)
    toks = np.empty(n, dtype=np.int64)
    toks[0] = 10
    for i in range(1, n):
        toks[i] = (3 * toks[i - 1] + rng.integers(0, 3)) % (vocab_size - 10) + 10
    toks[rng.choice(n, n // 50, replace=False)] = 2
    return toks


def position_tokens(n: int, offset: int = 0, doc_len: int = 37) -> np.ndarray:
    """Tokens whose value is FIRST_ID + offset + position, with EOS ending every doc_len tokens."""
    tokens = np.arange(n, dtype=np.int64) + FIRST_ID + offset
    tokens[doc_len - 1 :: doc_len] = EOS
    return tokens


def write_split(directory: Path, split: str, tokens: np.ndarray, shard_tokens: int, dtype: str) -> SplitInfo:
    shards = []
    for i, lo in enumerate(range(0, len(tokens), shard_tokens)):
        part = tokens[lo : lo + shard_tokens].astype("<u4" if dtype == "uint32" else "<u2")
        name = f"{split}_{i:05d}.bin"
        payload = part.tobytes()
        (directory / name).write_bytes(payload)
        shards.append(
            ShardInfo(name, len(part), int(np.count_nonzero(part == EOS)), hashlib.sha256(payload).hexdigest())
        )
    return SplitInfo(len(tokens), sum(s.documents for s in shards), tuple(shards))


def write_shard_dir(
    directory: Path,
    train: np.ndarray,
    validation: np.ndarray | None = None,
    shard_tokens: int = 1000,
    vocab_size: int = VOCAB,
    tokenizer_sha: str = TOKENIZER_SHA,
    eos_id: int = EOS,
) -> Manifest:
    directory.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    splits = {"train": write_split(directory, "train", train, shard_tokens, dtype)}
    if validation is not None:
        splits["validation"] = write_split(directory, "validation", validation, shard_tokens, dtype)
    manifest = Manifest(directory, vocab_size, eos_id, 1, 3, 0, tokenizer_sha, dtype, shard_tokens, splits)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))
    return manifest
