"""A source's token stream for one split: memory-mapped files read as one flat sequence.

A source is first read as its header (its manifest, or its Megatron index: no token is read), then opened.
Shard directories (manifest.json) and Megatron indexed datasets look the same to the loader:
`num_tokens` and `gather(starts, length)`, which copies windows out of the page cache without
any per-token Python work, and checks that every id it returns lies in the vocabulary (so the model
need not check its input ids on the device, which costs a host sync per micro-batch). A memory map holds
its file open, so a stream maps at most MAX_OPEN_PARTS of its files at a time (the ones read last): a
source of thousands of shards stays below `ulimit -n`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retnet_train.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    check_token_ids,
    read_manifest,
    verify_shards,
)
from retnet_train.data.megatron import (
    RANGE_CHECK_BLOCK_TOKENS,
    index_digest,
    megatron_missing_half,
    megatron_prefix,
    open_megatron_tokens,
    read_megatron_index,
    spread_starts,
)

MAX_OPEN_PARTS = 16  # memory-mapped files per stream; a window spans one or two of them


@dataclass(frozen=True)
class SourceHeader:
    """What a source's manifest (or Megatron index) says of one split, read without its tokens."""

    name: str
    path: Path  # the shard directory, or the Megatron dataset's PREFIX
    split: str
    origin: Path  # manifest.json or PREFIX.idx: what errors name
    num_tokens: int
    eos_id: int
    digest: str  # the split's data wherever it lies: a resume refuses other data under the same name
    manifest: Manifest | None = None  # None: a Megatron dataset


class TokenStream:
    def __init__(
        self, header: SourceHeader, part_paths: list[Path], lengths: list[int], dtype: np.dtype, vocab_size: int | None
    ):
        """part_paths: the token files read in order, of `lengths` tokens of `dtype` each (checked against
        their sizes before); vocab_size: ids must lie below it (None: unchecked)."""
        self.header, self.vocab_size = header, vocab_size
        self.name, self.origin, self.eos_id, self.manifest = header.name, header.origin, header.eos_id, header.manifest
        self._part_paths, self._dtype = part_paths, dtype
        self._mapped: OrderedDict[int, np.memmap] = OrderedDict()  # part -> its map, the last read last
        self._identities = [file_identity(os.stat(path)) for path in part_paths]  # the files as they are now
        self._starts = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])  # part i: [s[i], s[i+1])
        self.num_tokens = int(self._starts[-1])

    def _part(self, part: int) -> np.memmap:
        """Part `part`'s tokens, memory-mapped; the map read longest ago is closed past MAX_OPEN_PARTS."""
        if part in self._mapped:
            self._mapped.move_to_end(part)
        else:
            self._mapped[part] = self._map(part)
            if len(self._mapped) > MAX_OPEN_PARTS:
                self._mapped.popitem(last=False)  # its file closes with its last reference
        return self._mapped[part]

    def _map(self, part: int) -> np.memmap:
        """Part `part` memory-mapped, if it is the file the stream opened: one replaced or rewritten since holds
        other data than the run's checkpoints claim (their digest is of the data at start)."""
        path = self._part_paths[part]
        with open(path, "rb") as f:  # the map keeps its own descriptor
            if file_identity(os.fstat(f.fileno())) != self._identities[part]:
                raise ManifestError(
                    f"{path}: changed since the loader opened it (replaced or rewritten while the run reads it); "
                    "run the same command again to check it against its manifest and the checkpoint's data"
                )
            return np.memmap(f, dtype=self._dtype, mode="r")

    @property
    def documents_start_with_bos(self) -> bool:
        """Whether every document of this source starts with BOS: only a manifest says so (a Megatron
        dataset records no framing)."""
        return self.manifest is not None and self.manifest.add_bos

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows tokens[s : s + length] for each s in starts, as int64 [len(starts), length]."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(np.asarray(starts, dtype=np.int64)):
            if start < 0 or start + length > self.num_tokens:
                raise IndexError(f"{self.origin}: window [{start}, {start + length}) outside {self.num_tokens} tokens")
            part = int(np.searchsorted(self._starts, start, side="right")) - 1
            filled = 0
            while filled < length:  # a window spans at most a few parts (usually one)
                lo = start + filled - self._starts[part]
                tokens = self._part(part)
                take = min(length - filled, len(tokens) - lo)
                out[row, filled : filled + take] = tokens[lo : lo + take]
                if self.vocab_size is not None:
                    check_token_ids(out[row, filled : filled + take], self.vocab_size, self._part_paths[part], lo)
                filled += take
                part += 1
        return out


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file apart from one replaced (device, inode) or rewritten (size, mtime) under its name."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def check_id_spread(stream: TokenStream) -> None:
    """Token ids of the blocks a Megatron source's are checked at (megatron.spread_starts) against the stream's
    vocabulary, naming the file of the first one outside: shards written for another vocabulary fail at
    start, not when a window first reaches them. gather() still checks every id it reads."""
    if stream.vocab_size is None:
        return
    n = stream.num_tokens
    for start in spread_starts(n):
        length = min(RANGE_CHECK_BLOCK_TOKENS, n - int(start))
        if length > 0:
            stream.gather([int(start)], length)


def read_header(name: str, path: str | Path, split: str, eos_id: int | None = None) -> SourceHeader:
    """A shard directory's manifest, or a Megatron `.bin`/`.idx` prefix's index (train split only: it has
    no split; eos_id: its EOS id, which it does not record)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file() and (indexes := sorted(path.glob("*.idx"))):
            raise ManifestError(
                f"source {name!r}: {path} has no {MANIFEST_NAME} but holds Megatron indexes; give "
                f"the prefix of one as the path, e.g. {indexes[0].with_suffix('')}"
            )
        return _shard_header(name, path, split)
    prefix = megatron_prefix(path)
    if prefix is None and (missing := megatron_missing_half(path)):
        raise ManifestError(f"source {name!r}: {missing}")
    if prefix is None and not path.exists():
        raise ManifestError(f"data source {name!r}: {path} does not exist")
    if prefix is None:
        raise ManifestError(f"source {name!r}: {path} is neither a shard directory nor a Megatron .bin/.idx prefix")
    if split != "train":
        raise ManifestError(
            f"source {name!r}: Megatron dataset {prefix} has no {split!r} split; "
            "give the validation data as its own source"
        )
    if eos_id is None:
        raise ManifestError(f"source {name!r}: Megatron dataset {prefix} does not record the EOS id; pass eos_id")
    return _megatron_header(name, prefix, eos_id)


def _shard_header(name: str, directory: Path, split: str) -> SourceHeader:
    manifest = read_manifest(directory)
    info = manifest.split(split)
    if info.tokens == 0:
        raise ManifestError(f"{manifest.path}: split {split!r} has no tokens (source {name!r})")
    digest = manifest.split_digest(split)
    return SourceHeader(name, directory, split, manifest.path, info.tokens, manifest.eos_id, digest, manifest)


def _megatron_header(name: str, prefix: Path, eos_id: int) -> SourceHeader:
    index = read_megatron_index(prefix.with_name(prefix.name + ".idx"))
    tokens = int(index.sizes.astype(np.int64).sum())
    if tokens == 0:
        raise ManifestError(f"{prefix.with_name(prefix.name + '.bin')}: no tokens")
    return SourceHeader(name, prefix, "train", index.path, tokens, eos_id, index_digest(index, tokens))


def open_header(header: SourceHeader, verify_checksums: bool = False, vocab_size: int | None = None) -> TokenStream:
    """The tokens a header describes, memory-mapped after their files are checked against it: shard sizes
    always (cheap, catches truncation), sha256 on request (reads everything); a Megatron .bin's size, EOS
    ends and a spread of its ids."""
    if header.manifest is None:
        tokens, _ = open_megatron_tokens(header.path, header.eos_id, vocab_size)  # checks it, then unmapped
        bin_path = header.path.with_name(header.path.name + ".bin")
        return TokenStream(header, [bin_path], [tokens.size], tokens.dtype, vocab_size)
    manifest = header.manifest
    problems = verify_shards(manifest, checksums=verify_checksums, splits=(header.split,))
    if problems:
        raise ManifestError(
            f"source {header.name!r}: damaged shards (run `python -m data_prep.verify {manifest.directory}`):\n  "
            + "\n  ".join(problems)
        )
    lengths = [shard.tokens for shard in manifest.split(header.split).shards]
    return TokenStream(header, manifest.shard_paths(header.split), lengths, manifest.np_dtype, manifest.vocab_size)


def open_stream(
    name: str,
    path: str | Path,
    split: str,
    eos_id: int | None = None,
    verify_checksums: bool = False,
    vocab_size: int | None = None,
) -> TokenStream:
    """A shard directory, or a Megatron `.bin`/`.idx` prefix (train split only: it has no split)."""
    return open_header(read_header(name, path, split, eos_id), verify_checksums, vocab_size)
