"""Data loading for pretraining: memory-mapped token shards -> packed, resumable micro-batches.

    loader = TokenLoader({"web": ("data/web", 0.7), "code": ("data/code", 0.3)}, seq_len=2048,
                         micro_batch_size=8, dp_rank=rank, dp_world_size=world, seed=0,
                         tokenizer_sha256=sha256_file("tok/tokenizer.model"), vocab_size=32000)
    batch = next(loader)  # input_ids, labels (shifted), doc_starts: [B, seq_len]
    ckpt["data"] = loader.state_dict()   # JSON; counts global sequences consumed
    val = build_validation_loader({"web": ("data/web", 1.0)}, 2048, 8, rank, world)  # one pass

Shards are written by `python -m data_prep.tokenize` (format: manifest.py).
"""

from retnet_train.data.loader import (
    TokenLoader,
    ValidationLoader,
    build_validation_loader,
    make_batch,
)
from retnet_train.data.manifest import Manifest, ManifestError, read_manifest, sha256_file, verify_shards
from retnet_train.data.megatron import read_megatron_index
from retnet_train.data.mixing import MixingSchedule
from retnet_train.data.sources import normalize_sources, plan_stream, plan_validation

__all__ = [
    "Manifest",
    "ManifestError",
    "MixingSchedule",
    "TokenLoader",
    "ValidationLoader",
    "build_validation_loader",
    "make_batch",
    "normalize_sources",
    "plan_stream",
    "plan_validation",
    "read_manifest",
    "read_megatron_index",
    "sha256_file",
    "verify_shards",
]
