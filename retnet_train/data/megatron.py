"""Reader for Megatron-LM / GPT-NeoX indexed datasets (`PREFIX.bin` + `PREFIX.idx`, MMIDIDX).

`.idx` layout (little-endian), as written by Megatron's MMapIndexedDatasetBuilder:
  9 bytes magic b"MMIDIDX\\x00\\x00", uint64 version (1), uint8 dtype code,
  uint64 sequence count S, uint64 document-index count D,
  int32 sizes[S] (tokens per sequence), int64 pointers[S] (byte offset in .bin),
  int64 document_indices[D] (sequence index where each document starts, plus S at the end).
`.bin` is the token ids of all sequences back to back. Tokenized with `--append-eod`, every
document ends in the EOD (= EOS) token, which is what the loader's document boundaries need.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retnet_train.data.manifest import ManifestError

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
_HEADER = struct.Struct("<QBQQ")
MAX_EOD_CHECKS = 100_000


@dataclass(frozen=True)
class MegatronIndex:
    path: Path
    dtype: np.dtype
    sizes: np.ndarray  # int32 [S]
    pointers: np.ndarray  # int64 [S]
    document_indices: np.ndarray  # int64 [D]


def megatron_prefix(path: str | Path) -> Path | None:
    """`prefix`, `prefix.idx` or `prefix.bin` -> prefix, if both files exist; else None."""
    path = Path(path)
    prefix = path.with_suffix("") if path.suffix in (".idx", ".bin") else path
    if prefix.with_name(prefix.name + ".idx").is_file() and prefix.with_name(prefix.name + ".bin").is_file():
        return prefix
    return None


def read_megatron_index(idx_path: str | Path) -> MegatronIndex:
    idx_path = Path(idx_path)
    with open(idx_path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise ManifestError(f"{idx_path}: not an MMIDIDX index (magic {magic!r})")
        header = f.read(_HEADER.size)
    if len(header) != _HEADER.size:
        raise ManifestError(f"{idx_path}: truncated header")
    version, code, n_seq, n_doc = _HEADER.unpack(header)
    if version != 1:
        raise ManifestError(f"{idx_path}: MMIDIDX version {version} is not supported (expected 1)")
    if code not in DTYPE_CODES or np.dtype(DTYPE_CODES[code]).kind not in "iu":
        raise ManifestError(f"{idx_path}: dtype code {code} is not an integer token type")
    offset = len(MAGIC) + _HEADER.size
    expected = offset + n_seq * 4 + n_seq * 8 + n_doc * 8
    if idx_path.stat().st_size != expected:
        raise ManifestError(f"{idx_path}: size {idx_path.stat().st_size} bytes, header implies {expected}")
    sizes = np.memmap(idx_path, np.dtype("<i4"), "r", offset, (n_seq,)) if n_seq else np.zeros(0, np.int32)
    offset += n_seq * 4
    pointers = np.memmap(idx_path, np.dtype("<i8"), "r", offset, (n_seq,)) if n_seq else np.zeros(0, np.int64)
    offset += n_seq * 8
    docs = np.memmap(idx_path, np.dtype("<i8"), "r", offset, (n_doc,)) if n_doc else np.zeros(0, np.int64)
    return MegatronIndex(idx_path, np.dtype(DTYPE_CODES[code]).newbyteorder("<"), np.asarray(sizes),
                         np.asarray(pointers), np.asarray(docs))


def open_megatron_tokens(prefix: Path, eos_id: int | None) -> tuple[np.memmap, MegatronIndex]:
    """Memory-map PREFIX.bin as one token stream after checking it against PREFIX.idx.

    The sequences must be stored back to back (they always are in Megatron's builder) and, if
    eos_id is given, documents must end with it (all checked, or an even spread of MAX_EOD_CHECKS)."""
    idx = read_megatron_index(prefix.with_name(prefix.name + ".idx"))
    bin_path = prefix.with_name(prefix.name + ".bin")
    itemsize = idx.dtype.itemsize
    total = int(idx.sizes.astype(np.int64).sum())
    if bin_path.stat().st_size != total * itemsize:
        raise ManifestError(f"{bin_path}: size {bin_path.stat().st_size} bytes, {idx.path} implies {total * itemsize}")
    starts = np.concatenate([[0], np.cumsum(idx.sizes.astype(np.int64))[:-1]]) * itemsize
    if idx.sizes.size and not np.array_equal(idx.pointers, starts):
        raise ManifestError(f"{idx.path}: sequence pointers are not contiguous; this reader needs a packed .bin")
    if total == 0:
        raise ManifestError(f"{bin_path}: no tokens")
    tokens = np.memmap(bin_path, idx.dtype, "r")
    if eos_id is not None and idx.document_indices.size > 1:
        # last token of each non-empty document: sequence doc_end-1 ends at its pointer + size
        last_seq = idx.document_indices[1:] - 1
        if last_seq.size > MAX_EOD_CHECKS:  # random reads: check an even spread, not all of billions
            last_seq = last_seq[np.linspace(0, last_seq.size - 1, MAX_EOD_CHECKS).astype(np.int64)]
        ends = (idx.pointers[last_seq] // itemsize) + idx.sizes[last_seq]
        ends = ends[idx.document_indices[1:] > idx.document_indices[:-1]]
        bad = np.flatnonzero(tokens[ends - 1] != eos_id)
        if bad.size:
            raise ManifestError(
                f"{idx.path}: {bad.size} of {ends.size} documents do not end with EOS id {eos_id} "
                f"(first: document {int(bad[0])}); tokenize with Megatron's --append-eod or pass the right eos_id"
            )
    return tokens, idx
