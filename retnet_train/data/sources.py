"""What the loaders check of their sources before they read a token, from the manifests and Megatron
indexes alone: that the sources agree with each other and with the model, how many windows of seq_len + 1
tokens each holds, and that the validation split gives every data-parallel rank a share.

TokenLoader and build_validation_loader start with plan_stream / plan_validation; the preflight runs these
alone (no shard is opened), so it refuses a config with the trainer's own messages.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from retnet_train.data.manifest import ManifestError, read_manifest
from retnet_train.data.mixing import MixingSchedule
from retnet_train.data.token_stream import SourceHeader, read_header

SourceSpec = Any  # (path, weight) | {"path": ..., "weight": ...} | path (weight 1)


@dataclass(frozen=True)
class StreamPlan:
    """A split of the sources, checked: name -> header and name -> windows of seq_len + 1 tokens."""

    headers: dict[str, SourceHeader]
    windows: dict[str, int]
    schedule: MixingSchedule | None = None  # the training stream's mix of its sources
    weights: dict[str, float] | None = None  # ... from these weights


def normalize_sources(sources: Mapping[str, SourceSpec]) -> dict[str, tuple[Path, float]]:
    """Accept the few spellings a config may use; return name -> (path, weight)."""
    if not isinstance(sources, Mapping) or not sources:
        raise ValueError(f"sources must be a non-empty mapping name -> (path, weight), got {sources!r}")
    out = {}
    for name, spec in sources.items():
        if isinstance(spec, Mapping):
            if "path" not in spec:
                raise ValueError(f"data source {name!r}: missing key 'path' in {dict(spec)!r}")
            path, weight = spec["path"], spec.get("weight", 1.0)
        elif isinstance(spec, (str, Path)):
            path, weight = spec, 1.0
        else:
            try:
                path, weight = spec
            except (TypeError, ValueError):
                raise ValueError(f"data source {name!r}: expected (path, weight), got {spec!r}") from None
        out[str(name)] = (Path(path), float(weight))
    return out


def check_positive_int(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def plan_stream(
    sources: Mapping[str, SourceSpec],
    seq_len: int,
    split: str = "train",
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    eos_id: int | None = None,
) -> StreamPlan:
    """The training stream's sources: weights the mixing schedule can hold, headers that agree, and at
    least one window in each."""
    specs = normalize_sources(sources)
    weights = {name: weight for name, (_, weight) in specs.items()}
    schedule = MixingSchedule(weights)
    headers = read_headers(specs, split, tokenizer_sha256, vocab_size, eos_id)
    return StreamPlan(headers, window_counts(headers, check_positive_int("seq_len", seq_len)), schedule, weights)


def plan_validation(
    sources: Mapping[str, SourceSpec],
    seq_len: int,
    dp_world_size: int = 1,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    eos_id: int | None = None,
    max_sequences: int | None = None,
) -> StreamPlan:
    """The "validation" split of the sources that have one (the others are left out with a warning),
    giving each of dp_world_size ranks at least one sequence of each source that has as many (a source
    with fewer is left out of validation, with a warning)."""
    usable = validation_sources(normalize_sources(sources), seq_len)
    headers = read_headers(usable, "validation", tokenizer_sha256, vocab_size, eos_id)
    windows = window_counts(headers, check_positive_int("seq_len", seq_len))
    share = validation_share(windows, headers, seq_len, dp_world_size, max_sequences)
    warn_unshared(share, windows, seq_len, dp_world_size)
    return StreamPlan(headers, windows)


def read_headers(
    specs: Mapping[str, tuple[Path, float]],
    split: str,
    tokenizer_sha256: str | None,
    vocab_size: int | None,
    eos_id: int | None,
) -> dict[str, SourceHeader]:
    """Every source's header, checking that all agree with each other and with the model's tokenizer."""
    headers: dict[str, SourceHeader] = {}
    first: SourceHeader | None = None
    # shard directories first: their manifests supply the EOS id that Megatron sources lack
    for name in sorted(specs, key=lambda n: (not specs[n][0].is_dir(), n)):
        header = read_header(name, specs[name][0], split, eos_id if eos_id is not None else _eos_of(first))
        if header.manifest is not None:
            header.manifest.check_tokenizer(tokenizer_sha256, vocab_size)
            if first is not None and first.manifest is not None:
                # mixing shards of two tokenizers silently trains on garbage
                header.manifest.check_tokenizer(first.manifest.tokenizer_sha256, first.manifest.vocab_size)
        if eos_id is not None and header.eos_id != eos_id:
            raise ManifestError(f"{header.origin}: EOS id {header.eos_id}, expected {eos_id}")
        if first is not None and header.eos_id != first.eos_id:
            raise ManifestError(f"{header.origin}: EOS id {header.eos_id} differs from {first.origin} ({first.eos_id})")
        first = first or header
        headers[name] = header
    return dict(sorted(headers.items()))


def _eos_of(header: SourceHeader | None) -> int | None:
    return None if header is None else header.eos_id


def window_counts(headers: Mapping[str, Any], seq_len: int) -> dict[str, int]:
    """name -> windows of seq_len + 1 tokens (stride seq_len) for headers or streams (num_tokens, origin)."""
    counts = {}
    for name, header in headers.items():
        n = (header.num_tokens - 1) // seq_len
        if n < 1:
            raise ManifestError(
                f"{header.origin}: seq_len {seq_len} is longer than source {name!r} "
                f"({header.num_tokens} tokens; a sequence needs seq_len + 1)"
            )
        counts[name] = n
    return counts


def validation_sources(specs: Mapping[str, tuple[Path, float]], seq_len: int) -> dict[str, tuple[Path, float]]:
    """The sources with a validation split of more than seq_len tokens; the others are left out with a warning."""
    usable, longest = {}, 0
    for name, spec in specs.items():
        path = spec[0]
        if path.is_dir():
            info = read_manifest(path).splits.get("validation")
            longest = max(longest, info.tokens if info is not None else 0)
            if info is not None and info.tokens > seq_len:
                usable[name] = spec
                continue
        warnings.warn(
            f"data source {name!r} ({path}) has no validation split with more than {seq_len} tokens; "
            "it is left out of validation",
            stacklevel=4,  # the caller of build_validation_loader
        )
    if not usable:
        shorter = f"a sequence length below {longest} (data.seq_len; evaluate: --seq-len), " if longest > 1 else ""
        raise ManifestError(
            f"no data source has a validation split of more than {seq_len} tokens (sources: {sorted(specs)}; "
            f"the longest: {longest}); the validation loss needs one: {shorter}a larger --validation-fraction "
            "(python -m data_prep.tokenize), or no validation (train.eval_interval=0; evaluate: --tasks without --data)"
        )
    return usable


def validation_share(
    windows: Mapping[str, int],
    headers: Mapping[str, Any],
    seq_len: int,
    dp_world_size: int,
    max_sequences: int | None,
) -> dict[str, int]:
    """name -> windows of that source each rank evaluates: all of them, or max_sequences spread over the
    sources in proportion to their windows, but at least one per rank of each (its loss is logged on its
    own); equal shares per rank, the remainder dropped. A source with fewer windows than ranks gets 0."""
    world = check_positive_int("dp_world_size", dp_world_size)
    available = sum(windows.values())
    total = available if max_sequences is None else min(available, check_positive_int("max_sequences", max_sequences))
    share = {name: min(n // world, max(1, total * n // (available * world))) for name, n in windows.items()}
    if not any(share.values()):
        counts = "" if len(windows) == 1 else f" ({', '.join(map(str, windows.values()))} per source)"
        raise ManifestError(
            f"validation split has {available} sequences of {seq_len} tokens{counts}, fewer than "
            f"dp_world_size={dp_world_size}{' in every source' if counts else ''} "
            f"(sources: {', '.join(str(h.origin) for h in headers.values())})"
        )
    return share


def warn_unshared(share: Mapping[str, int], windows: Mapping[str, int], seq_len: int, dp_world_size: int) -> None:
    """Sources that cannot give every rank a window are left out: every rank must run the same batches."""
    for name, n in share.items():
        if n == 0:
            warnings.warn(
                f"data source {name!r} has {windows[name]} validation sequences of {seq_len} tokens, fewer than "
                f"dp_world_size={dp_world_size}: it is left out of validation",
                stacklevel=4,  # the caller of build_validation_loader
            )
