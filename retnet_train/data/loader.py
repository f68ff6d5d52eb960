"""Packed-sequence loaders: TokenLoader (infinite, resumable, mixed) and ValidationLoader (one pass).

Every source's split is cut into non-overlapping windows of seq_len + 1 tokens (stride seq_len,
so each token is a label exactly once per epoch). Global sequence g of the run is
    source, k = mixing.assign(g);  epoch, i = divmod(k, windows[source])
    window = permute(i, windows[source], key(seed, source, epoch))
so the whole stream is a pure function of (sources, seq_len, seed) and the loader state is a
single counter: global sequences consumed. Data-parallel rank r of W takes, from the resume
point on, sequences r, r + W, r + 2W, ... of each micro-step's B * W; a resumed run therefore
continues with exactly the next sequences even if B, gradient accumulation or W changed.
A run switched to another stream on purpose (switch_on_change, stream_switch.py) starts each source's
k at the windows earlier streams read of it (`offsets`).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from retnet_train.data.mixing import mix_of
from retnet_train.data.permutation import derive_key, permute
from retnet_train.data.sources import (
    SourceSpec,
    StreamPlan,
    check_positive_int,
    plan_stream,
    plan_validation,
    validation_share,
    window_counts,
)
from retnet_train.data.stream_switch import continued_offsets, shares, switch_note
from retnet_train.data.token_stream import SourceHeader, TokenStream, check_id_spread, open_header

STATE_VERSION = 2  # 2: + offsets (1 is read as none)
READ_VERSIONS = (1, 2)


def _check_rank(dp_rank: int, dp_world_size: int) -> None:
    check_positive_int("dp_world_size", dp_world_size)
    if not isinstance(dp_rank, (int, np.integer)) or not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank must be in [0, {dp_world_size}), got {dp_rank!r}")


def open_streams(plan: StreamPlan, verify_checksums: bool, vocab_size: int | None) -> dict[str, TokenStream]:
    """The plan's sources, opened; a shard directory's token ids checked against the vocabulary at a spread of
    places (a Megatron dataset's were, as it opened)."""
    streams = {name: open_header(header, verify_checksums, vocab_size) for name, header in plan.headers.items()}
    for stream in streams.values():
        if stream.manifest is not None:
            check_id_spread(stream)
    return streams


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
    change_hint: appended to the refusal of a state from another stream (what to do about it).
    switch_on_change: a state from another stream is not refused: a new stream starts, each source
    after the windows the saved one read of it where its data and windowing are the same
    (stream_switch.py); `switched` then says what changed and where each source starts.
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
        change_hint: str = "",
        switch_on_change: bool = False,
    ):
        self.seq_len = check_positive_int("seq_len", seq_len)
        self.micro_batch_size = check_positive_int("micro_batch_size", micro_batch_size)
        _check_rank(dp_rank, dp_world_size)
        self.dp_rank, self.dp_world_size = int(dp_rank), int(dp_world_size)
        self.seed, self.split, self.change_hint = int(seed), split, change_hint
        self.switch_on_change, self.switched = switch_on_change, None
        plan = plan_stream(sources, self.seq_len, split, tokenizer_sha256, vocab_size, eos_id)
        self.weights, self.schedule, self.windows = plan.weights, plan.schedule, plan.windows
        self.streams = open_streams(plan, verify_checksums, vocab_size)
        self.eos_id = next(iter(self.streams.values())).eos_id
        self.consumed = 0  # global sequences consumed by all ranks together
        self.offsets = {name: 0 for name in self.streams}  # windows of each source read before this stream
        self._epochs_noted = self.epochs_read()  # what epoch_notes said last

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
        epoch, i = np.divmod(k + self.offsets[name], n)
        window = np.empty_like(k)
        for e in np.unique(epoch):  # one or two epochs per batch in practice
            sel = epoch == e
            window[sel] = permute(i[sel], n, derive_key(self.seed, name, int(e)))
        return window

    def epochs_read(self) -> dict[str, int]:
        """name -> how many times the sequences consumed (and the offsets) read all of that source's windows."""
        taken = self.schedule.taken(self.consumed)
        return {name: (self.offsets[name] + taken[name]) // self.windows[name] for name in self.streams}

    def epoch_notes(self) -> list[str]:
        """A line for each source read through since the last call (or the start, or the resume): it repeats
        from here, its windows in a new order."""
        notes, now = [], self.epochs_read()
        for name, epochs in now.items():
            if epochs > self._epochs_noted[name]:
                notes.append(
                    f"data source {name!r} ({self.streams[name].header.path}): all {self.windows[name]:,} of its "
                    f"sequences of {self.seq_len} tokens read; epoch {epochs + 1} of it begins, the same sequences "
                    "in a new order"
                )
        self._epochs_noted = now
        return notes

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "consumed_sequences": self.consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "split": self.split,
            "weights": dict(self.weights),
            "windows": dict(self.windows),
            "sources": {name: _source_state(stream.header) for name, stream in self.streams.items()},
            "offsets": dict(self.offsets),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after `state["consumed_sequences"]`. Everything that defines the stream must be
        unchanged (else the run would silently repeat or skip data); B and W may differ. With
        switch_on_change a changed stream is started instead (class docstring)."""
        changes = self.check_state(state)
        if changes:
            mine = self.state_dict()  # this stream, its offsets not yet set
            self.offsets = continued_offsets(state, mine)
            self.consumed, self.switched = 0, switch_note(state, mine, self.offsets)
        else:
            offsets = state.get("offsets") or {}
            self.offsets = {name: int(offsets.get(name, 0)) for name in self.streams}
            self.consumed = state["consumed_sequences"]
        self._epochs_noted = self.epochs_read()  # epochs begun before the checkpoint were said then

    def check_state(self, state: Mapping[str, Any]) -> list[str]:
        """Raise what load_state_dict refuses of `state`, changing nothing (a resume checks it before it
        converts a checkpoint); returns the stream changes that switch_on_change lets through."""
        if state.get("version") not in READ_VERSIONS:
            raise ValueError(f"loader state version {state.get('version')!r} is not one of {READ_VERSIONS}")
        consumed = state.get("consumed_sequences")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"loader state key 'consumed_sequences' must be an integer >= 0, got {consumed!r}")
        changes = self._stream_changes(state)
        if changes and not self.switch_on_change:
            raise ValueError(f"the data stream is not the checkpoint's: {'; '.join(changes)}{self.change_hint}")
        return changes

    def _stream_changes(self, state: Mapping[str, Any]) -> list[str]:
        """What differs between the stream `state` was saved from and this one, in the config's terms (the
        data.* key); empty when it is the same."""
        mine, changes = self.state_dict(), []
        theirs = state.get("weights")
        names = list(theirs) if isinstance(theirs, Mapping) else []
        moved = [f"source {n!r} added" for n in mine["weights"] if n not in names]
        moved += [f"source {n!r} dropped" for n in names if n not in mine["weights"]]
        if moved:  # a source is named after its directory
            changes.append(f"data.paths: {', '.join(moved)}")
        elif mix_of(theirs) is None or mix_of(theirs) != mix_of(mine["weights"]):  # another scale: the same mix
            old = shares(theirs) if isinstance(theirs, Mapping) and theirs else repr(theirs)
            changes.append(f"data.weights: {old} -> {shares(mine['weights'])}")
        changes += self._source_changes(state.get("sources"))
        changes += [
            f"data.{key}: {state.get(key)} -> {mine[key]}" for key in ("seq_len", "seed") if state.get(key) != mine[key]
        ]
        if state.get("split") != mine["split"]:
            changes.append(f"split {state.get('split')!r} -> {mine['split']!r}")
        if not changes and state.get("windows") != mine["windows"]:
            changes.append(f"the sources' windows {state.get('windows')} -> {mine['windows']} (other data)")
        return changes

    def _source_changes(self, theirs: Any) -> list[str]:
        """Sources whose data differs from the same-named source of the state (a state saved without
        digests has nothing to compare)."""
        changes = []
        for name, stream in self.streams.items():
            saved = theirs.get(name) if isinstance(theirs, Mapping) else None
            if isinstance(saved, Mapping) and saved.get("digest") != stream.header.digest:
                changes.append(
                    f"data source {name!r} at {stream.header.path} holds other data than the checkpoint's source "
                    f"{name!r} (at {saved.get('path')} when it was saved): digest "
                    f"{stream.header.digest[:12]}... is not {str(saved.get('digest'))[:12]}..."
                )
        return changes


def _source_state(header: SourceHeader) -> dict[str, str]:
    """What a resume checks of a source: its data, by digest (the path only names it in errors)."""
    return {"path": str(header.path), "digest": header.digest}


class ValidationLoader:
    """One deterministic pass over every validation window of every source, in order.

    A batch holds one source's windows (`batch_sources` names it, batch by batch), so that each
    source's loss can be told apart. Every rank gets a disjoint, equal share of each source (the
    remainder of its windows mod W is dropped), so all ranks run the same batches, source by source;
    each source's last batch may be smaller than micro_batch_size. Re-iterable.
    max_sequences caps the pass at about that many windows, spread evenly over each source, in
    proportion to its windows (sources.validation_share).
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
        self.seq_len = check_positive_int("seq_len", seq_len)
        self.micro_batch_size = check_positive_int("micro_batch_size", micro_batch_size)
        _check_rank(dp_rank, dp_world_size)
        streams = dict(sorted(streams.items()))
        self.eos_id = next(iter(streams.values())).eos_id
        windows = window_counts(streams, self.seq_len)
        share = validation_share(windows, streams, seq_len, dp_world_size, max_sequences)
        # sources that cannot give every rank a window are left out (plan_validation warns)
        self.streams = {name: stream for name, stream in streams.items() if share[name]}
        self.windows = {name: windows[name] for name in self.streams}
        self._picks = {}  # name -> this rank's windows of that source
        for name in self.streams:
            picked = share[name] * dp_world_size
            # an even spread over the source's windows, so that a capped pass measures all of its files
            # (which come in corpus order), not just the first
            spread = (np.arange(picked, dtype=np.int64) * windows[name]) // picked
            self._picks[name] = spread[dp_rank::dp_world_size]
        mb = self.micro_batch_size
        self.batch_sources = [name for name, p in self._picks.items() for _ in range(math.ceil(p.size / mb))]

    def __len__(self) -> int:
        return len(self.batch_sources)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for name, picks in self._picks.items():
            for lo in range(0, picks.size, self.micro_batch_size):
                starts = picks[lo : lo + self.micro_batch_size] * self.seq_len
                yield make_batch(self.streams[name].gather(starts, self.seq_len + 1), self.eos_id)


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
    plan = plan_validation(sources, seq_len, dp_world_size, tokenizer_sha256, vocab_size, eos_id, max_sequences)
    streams = open_streams(plan, verify_checksums, vocab_size)
    return ValidationLoader(streams, seq_len, micro_batch_size, dp_rank, dp_world_size, max_sequences)
