"""Packed-sequence loaders: TokenLoader (infinite, resumable, mixed) and ValidationLoader (one pass).

Every source's split is cut into non-overlapping windows of seq_len + 1 tokens (stride seq_len,
so each token is a label exactly once per epoch). Global sequence g of the run is
    source, k = mixing.assign(g);  epoch, i = divmod(k, windows[source])
    window = permute(i, windows[source], key(seed, source, epoch))
so the whole stream is a pure function of (sources, seq_len, seed) and the loader state is a
single counter: global sequences consumed. Data-parallel rank r of W takes, from the resume
point on, sequences r, r + W, r + 2W, ... of each micro-step's B * W; a resumed run therefore
continues with exactly the next sequences even if B, gradient accumulation or W changed.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from retnet_train.data.manifest import ManifestError, read_manifest
from retnet_train.data.mixing import MixingSchedule
from retnet_train.data.permutation import derive_key, permute
from retnet_train.data.token_stream import TokenStream, open_stream

STATE_VERSION = 1
SourceSpec = Any  # (path, weight) | {"path": ..., "weight": ...} | path (weight 1)


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


def _check_positive_int(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_rank(dp_rank: int, dp_world_size: int) -> None:
    _check_positive_int("dp_world_size", dp_world_size)
    if not isinstance(dp_rank, (int, np.integer)) or not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank must be in [0, {dp_world_size}), got {dp_rank!r}")


def open_streams(
    sources: Mapping[str, tuple[Path, float]],
    split: str,
    tokenizer_sha256: str | None,
    vocab_size: int | None,
    eos_id: int | None,
    verify_checksums: bool,
) -> dict[str, TokenStream]:
    """Open every source, checking that all agree with each other and with the model's tokenizer."""
    streams: dict[str, TokenStream] = {}
    first: TokenStream | None = None
    # shard directories first: their manifests supply the EOS id that Megatron sources lack
    for name in sorted(sources, key=lambda n: (not sources[n][0].is_dir(), n)):
        path, _ = sources[name]
        stream = open_stream(
            name, path, split, eos_id if eos_id is not None else _eos_of(first), verify_checksums, vocab_size
        )
        if stream.manifest is not None:
            stream.manifest.check_tokenizer(tokenizer_sha256, vocab_size)
            if first is not None and first.manifest is not None:
                # mixing shards of two tokenizers silently trains on garbage
                stream.manifest.check_tokenizer(first.manifest.tokenizer_sha256, first.manifest.vocab_size)
        if eos_id is not None and stream.eos_id != eos_id:
            raise ManifestError(f"{stream.origin}: EOS id {stream.eos_id}, expected {eos_id}")
        if first is not None and stream.eos_id != first.eos_id:
            raise ManifestError(f"{stream.origin}: EOS id {stream.eos_id} differs from {first.origin} ({first.eos_id})")
        first = first or stream
        streams[name] = stream
    return dict(sorted(streams.items()))


def _eos_of(stream: TokenStream | None) -> int | None:
    return None if stream is None else stream.eos_id


def _window_counts(streams: Mapping[str, TokenStream], seq_len: int) -> dict[str, int]:
    counts = {}
    for name, stream in streams.items():
        n = (stream.num_tokens - 1) // seq_len
        if n < 1:
            raise ManifestError(
                f"{stream.origin}: seq_len {seq_len} is longer than source {name!r} "
                f"({stream.num_tokens} tokens; a sequence needs seq_len + 1)"
            )
        counts[name] = n
    return counts


def document_starts(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """[B, T] bool: token t starts a document iff token t-1 ended one (is EOS)."""
    doc_starts = np.zeros(inputs.shape, dtype=bool)
    doc_starts[:, 1:] = inputs[:, :-1] == eos_id
    return doc_starts


def make_batch(windows: np.ndarray, eos_id: int) -> dict[str, torch.Tensor]:
    """[B, seq_len + 1] token windows -> input_ids, labels (shifted) and doc_starts."""
    inputs = np.ascontiguousarray(windows[:, :-1])
    return {
        "input_ids": torch.from_numpy(inputs),
        "labels": torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),
        "doc_starts": torch.from_numpy(document_starts(inputs, eos_id)),
    }


class TokenLoader:
    """Infinite iterator of micro-batches for one data-parallel rank (see module docstring).

    sources: name -> (shard dir or Megatron prefix, weight). Weights need not sum to 1.
    tokenizer_sha256 / vocab_size / eos_id: what the model expects; any manifest that disagrees is
    an error naming it. verify_checksums: sha256 every shard on open (sizes are always checked).
    """

    def __init__(
        self,
        sources: Mapping[str, SourceSpec],
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        seed: int = 0,
        split: str = "train",
        tokenizer_sha256: str | None = None,
        vocab_size: int | None = None,
        eos_id: int | None = None,
        verify_checksums: bool = False,
    ):
        self.seq_len = _check_positive_int("seq_len", seq_len)
        self.micro_batch_size = _check_positive_int("micro_batch_size", micro_batch_size)
        _check_rank(dp_rank, dp_world_size)
        self.dp_rank, self.dp_world_size = int(dp_rank), int(dp_world_size)
        self.seed, self.split = int(seed), split
        specs = normalize_sources(sources)
        self.weights = {name: weight for name, (_, weight) in specs.items()}
        self.schedule = MixingSchedule(self.weights)
        self.streams = open_streams(specs, split, tokenizer_sha256, vocab_size, eos_id, verify_checksums)
        self.eos_id = next(iter(self.streams.values())).eos_id
        self.windows = _window_counts(self.streams, self.seq_len)
        self.consumed = 0  # global sequences consumed by all ranks together

    @property
    def documents_start_with_bos(self) -> bool:
        """Whether every training document starts with BOS (every source's manifest says --bos): what a
        prompt must start with to look like the start of a training document."""
        return all(stream.documents_start_with_bos for stream in self.streams.values())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        g = self.consumed + self.dp_rank + self.dp_world_size * np.arange(self.micro_batch_size, dtype=np.int64)
        batch = make_batch(self.sequences(g), self.eos_id)
        self.consumed += self.micro_batch_size * self.dp_world_size
        return batch

    def sequences(self, g: np.ndarray) -> np.ndarray:
        """Token windows [len(g), seq_len + 1] of global sequence indices g (any order, any ranks)."""
        g = np.asarray(g, dtype=np.int64)
        source_pos, k = self.schedule.assign(g)
        out = np.empty((g.size, self.seq_len + 1), dtype=np.int64)
        for pos in np.unique(source_pos):
            name = self.schedule.names[pos]
            rows = np.flatnonzero(source_pos == pos)
            out[rows] = self.streams[name].gather(self._window_index(name, k[rows]) * self.seq_len, self.seq_len + 1)
        return out

    def _window_index(self, name: str, k: np.ndarray) -> np.ndarray:
        n = self.windows[name]
        epoch, i = np.divmod(k, n)
        window = np.empty_like(k)
        for e in np.unique(epoch):  # one or two epochs per batch in practice
            sel = epoch == e
            window[sel] = permute(i[sel], n, derive_key(self.seed, name, int(e)))
        return window

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "consumed_sequences": self.consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "split": self.split,
            "weights": dict(self.weights),
            "windows": dict(self.windows),
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Continue after `state["consumed_sequences"]`. Everything that defines the stream must be
        unchanged (else the run would silently repeat or skip data); B and W may differ.
        strict=False accepts a changed stream on purpose (new data or mix): only the counter is
        carried over, with a warning."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "split", "weights", "windows"):
            theirs = state.get(key)
            if key == "weights" and isinstance(theirs, Mapping):
                theirs = {k: float(v) for k, v in theirs.items()}
            if theirs != mine[key]:
                msg = (
                    f"loader state key {key!r} is {theirs!r} but this loader has {mine[key]!r}: "
                    "the data stream changed since the checkpoint (different data, seed, seq_len or mix)"
                )
                if strict:
                    raise ValueError(msg)
                warnings.warn(msg + "; continuing the new stream at the same sequence count", stacklevel=2)
        consumed = state.get("consumed_sequences")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"loader state key 'consumed_sequences' must be an integer >= 0, got {consumed!r}")
        self.consumed = consumed


class ValidationLoader:
    """One deterministic pass over every validation window of every source, in order.

    Ranks get disjoint, equal shares (the remainder of N mod W is dropped), so all ranks run the
    same number of batches; the last batch may be smaller than micro_batch_size. Re-iterable.
    max_sequences caps the pass at that many windows, spread evenly over all of them.
    """

    def __init__(
        self,
        streams: Mapping[str, TokenStream],
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        max_sequences: int | None = None,
    ):
        self.seq_len = _check_positive_int("seq_len", seq_len)
        self.micro_batch_size = _check_positive_int("micro_batch_size", micro_batch_size)
        _check_rank(dp_rank, dp_world_size)
        self.streams = dict(sorted(streams.items()))
        self.eos_id = next(iter(self.streams.values())).eos_id
        self.windows = _window_counts(self.streams, self.seq_len)
        self._ends = np.cumsum(list(self.windows.values()))  # global window g -> source by searchsorted
        windows = int(self._ends[-1])
        total = windows if max_sequences is None else min(windows, _check_positive_int("max_sequences", max_sequences))
        self.per_rank = total // dp_world_size
        if self.per_rank == 0:
            raise ManifestError(
                f"validation split has {total} sequences of {seq_len} tokens, fewer than dp_world_size={dp_world_size} "
                f"(sources: {', '.join(str(s.origin) for s in self.streams.values())})"
            )
        # capped: an even spread over all windows, so every source (and all of a source's files, which
        # come in corpus order) is measured, not just the first windows of the first source
        picked = (np.arange(total, dtype=np.int64) * windows) // total
        self._g = picked[dp_rank + dp_world_size * np.arange(self.per_rank, dtype=np.int64)]

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.micro_batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        names = list(self.streams)
        for lo in range(0, self.per_rank, self.micro_batch_size):
            g = self._g[lo : lo + self.micro_batch_size]
            source = np.searchsorted(self._ends, g, side="right")
            local = g - np.concatenate([[0], self._ends])[source]
            out = np.empty((g.size, self.seq_len + 1), dtype=np.int64)
            for s in np.unique(source):
                rows = np.flatnonzero(source == s)
                out[rows] = self.streams[names[s]].gather(local[rows] * self.seq_len, self.seq_len + 1)
            yield make_batch(out, self.eos_id)


def build_validation_loader(
    sources: Mapping[str, SourceSpec],
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    eos_id: int | None = None,
    max_sequences: int | None = None,
    verify_checksums: bool = False,
) -> ValidationLoader:
    """Validation loader over the "validation" split of the training sources (weights ignored).
    Sources without one (Megatron prefixes, an empty validation split) are skipped with a warning."""
    specs = normalize_sources(sources)
    usable = {}
    for name, spec in specs.items():
        path = spec[0]
        if path.is_dir():
            info = read_manifest(path).splits.get("validation")
            if info is not None and info.tokens > seq_len:
                usable[name] = spec
                continue
        warnings.warn(
            f"data source {name!r} ({path}) has no validation split with more than {seq_len} tokens; "
            "it is left out of validation",
            stacklevel=2,
        )
    if not usable:
        raise ManifestError(f"no data source has a usable validation split (sources: {sorted(specs)})")
    streams = open_streams(usable, "validation", tokenizer_sha256, vocab_size, eos_id, verify_checksums)
    return ValidationLoader(streams, seq_len, micro_batch_size, dp_rank, dp_world_size, max_sequences)
