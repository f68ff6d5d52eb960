"""A run's training and validation loaders, from its data.* and train.* config, on one data-parallel rank."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager

from ..data import TokenLoader, build_validation_loader, plan_stream, plan_validation, sha256_file
from ..data.manifest import ManifestError, TokenizerMismatch
from ..data.megatron import megatron_missing_half, megatron_prefix
from .config import TrainConfig, data_sources


def build_loaders(cfg: TrainConfig, vocab_size: int, dp_rank: int, dp_world: int, tokenizer_sha256: str | None = None):
    """(training loader, validation loader) of data-parallel rank `dp_rank` of `dp_world`; shards whose
    manifest disagrees with data.tokenizer (when set) or the model's vocab_size are refused. No validation
    loader (None) under train.eval_interval=0: the shards need no validation split then.
    tokenizer_sha256: data.tokenizer's sha256 where the caller has it (tokenizer_record), else hashed here."""
    sources, tokenizer_sha = _loader_inputs(cfg, tokenizer_sha256)
    with _naming_data_tokenizer(cfg, tokenizer_sha):
        loader = TokenLoader(
            sources,
            cfg.data.seq_len,
            cfg.train.micro_batch_size,
            dp_rank,
            dp_world,
            cfg.data.seed,
            "train",
            tokenizer_sha256=tokenizer_sha,
            vocab_size=vocab_size,
            verify_checksums=cfg.data.verify_checksums,
            change_hint=_change_hint(cfg),
            switch_on_change=cfg.data.on_change == "switch",
        )
        if not cfg.train.validates:
            return loader, None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            val_loader = build_validation_loader(
                sources,
                cfg.data.seq_len,
                cfg.train.micro_batch_size,
                dp_rank,
                dp_world,
                tokenizer_sha256=tokenizer_sha,
                vocab_size=vocab_size,
                max_sequences=_validation_sequences(cfg, dp_world),
                verify_checksums=cfg.data.verify_checksums,
            )
    _warn_once(caught)
    return loader, val_loader


def _warn_once(caught: list) -> None:
    """The validation loader's warnings (a source left out of validation) as the trainer's other warnings: a
    'warning: ...' line on stderr, from rank 0 alone (they follow from the manifests and the world size, the
    same on every rank). Warnings of other kinds go on to Python's."""
    import torch.distributed as dist

    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    for w in caught:
        if w.category is not UserWarning:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif main:
            print(f"warning: {w.message}", file=sys.stderr, flush=True)


def check_data(cfg: TrainConfig, vocab_size: int, dp_world: int) -> None:
    """What build_loaders refuses before it opens a shard, from the manifests and Megatron indexes alone
    (the preflight's check): the same checks, raising the same errors."""
    sources, tokenizer_sha = _loader_inputs(cfg)
    with _naming_data_tokenizer(cfg, tokenizer_sha):
        plan_stream(sources, cfg.data.seq_len, "train", tokenizer_sha, vocab_size)
        if not cfg.train.validates:
            return
        plan_validation(
            sources, cfg.data.seq_len, dp_world, tokenizer_sha, vocab_size, None, _validation_sequences(cfg, dp_world)
        )


def _loader_inputs(cfg: TrainConfig, tokenizer_sha: str | None = None) -> tuple[dict, str | None]:
    """(the loader's sources, the sha256 of data.tokenizer or None when unset); tokenizer_sha: that sha256,
    where the caller has it."""
    _check_tokenizer_file(cfg.data.tokenizer)
    if not cfg.data.tokenizer:
        tokenizer_sha = None
    elif tokenizer_sha is None:
        tokenizer_sha = sha256_file(cfg.data.tokenizer)
    missing = missing_data_paths(cfg.data.paths)
    if missing:
        raise ValueError(missing[0])
    refuse_megatron_only(cfg.data.paths)
    return data_sources(cfg), tokenizer_sha


def tokenizer_record(path: str | None) -> dict | None:
    """data.tokenizer as a checkpoint records it (None: none named): its sha256, against which inference
    checks the tokenizer it is given, and its absolute path here, where inference finds it when the path in
    the config is relative to a directory it does not run from."""
    if not path:
        return None
    _check_tokenizer_file(path)
    return {"sha256": sha256_file(path), "path": os.path.realpath(path)}


def _check_tokenizer_file(path: str | None) -> None:
    if path and not os.path.isfile(path):
        raise ValueError(
            f"data.tokenizer={path}: no such file (from {os.getcwd()}); "
            "data.tokenizer=null skips the check that the shards were tokenized with it"
        )


def missing_data_paths(paths: list) -> list[str]:
    """The data.paths entries not there as seen from here, each named by its key (the preflight lists them
    all): neither a file or directory nor a Megatron prefix (one half of a PREFIX.bin / PREFIX.idx pair
    alone is the loader's to name)."""
    return [
        f"data.paths[{i}]={path}: no such file or directory (from {os.getcwd()})"
        for i, path in enumerate(paths)
        if not (os.path.exists(path) or megatron_prefix(path) or megatron_missing_half(path))
    ]


@contextmanager
def _naming_data_tokenizer(cfg: TrainConfig, tokenizer_sha: str | None):
    """Shards of another tokenizer than data.tokenizer's: the error names the key, its file and the remedies.
    Two sources of different tokenizers (data.tokenizer=null) keep the loader's message."""
    try:
        yield
    except TokenizerMismatch as e:
        if e.expected != tokenizer_sha:
            raise
        raise ManifestError(
            f"{e.path}: shards were tokenized with tokenizer sha256 {e.found[:12]}..., but "
            f"data.tokenizer={cfg.data.tokenizer} has sha256 {e.expected[:12]}...: pass the tokenizer the shards "
            "were made with as data.tokenizer, or data.tokenizer=null to skip the check"
        ) from None


def _validation_sequences(cfg: TrainConfig, dp_world: int) -> int:
    return cfg.train.eval_batches * cfg.train.micro_batch_size * dp_world


def _change_hint(cfg: TrainConfig) -> str:
    """How to go on when a resume finds another data stream than its checkpoint's."""
    return (
        f"; data.paths={list(cfg.data.paths)} (with data.weights, data.seed, data.seq_len) must give the "
        "checkpoint's data stream. To go on with this data from the checkpoint (weights, optimizer, schedule "
        "and step kept; each unchanged source continues where it stopped): data.on_change=switch; to start "
        "afresh from its weights: a new run.dir with train.init_weights=<this checkpoint>"
    )


def refuse_megatron_only(paths: list) -> None:
    """The trainer takes the EOS id and the validation split from the shard directories' manifests; a
    Megatron index has neither."""
    prefixes = [path for path in paths if megatron_prefix(path) is not None]
    if prefixes and len(prefixes) == len(paths):
        raise ValueError(
            f"data.paths: {prefixes[0]} is a Megatron dataset, which records neither the EOS id nor a validation "
            "split: list a shard directory of the same tokenizer (python -m data_prep.tokenize) in data.paths too"
        )
