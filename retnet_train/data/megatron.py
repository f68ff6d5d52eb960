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

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retnet_train.data.manifest import ManifestError, check_token_ids

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_HEADER = struct.Struct("<QBQQ")
MAX_EOD_CHECKS = 100_000
RANGE_CHECK_BLOCKS, RANGE_CHECK_BLOCK_TOKENS = 256, 4096  # token ids checked against the vocabulary: a spread
DIGEST_SIZES = 4096  # sequence sizes a Megatron source's digest covers


@dataclass(frozen=True)
class MegatronIndex:
    path: Path
    dtype: np.dtype
    sizes: np.ndarray  # int32 [S]
    pointers: np.ndarray  # int64 [S]
    document_indices: np.ndarray  # int64 [D]


def _prefix_of(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".idx", ".bin") else path


def megatron_prefix(path: str | Path) -> Path | None:
    """`prefix`, `prefix.idx` or `prefix.bin` -> prefix, if both files exist; else None."""
    prefix = _prefix_of(Path(path))
    if prefix.with_name(prefix.name + ".idx").is_file() and prefix.with_name(prefix.name + ".bin").is_file():
        return prefix
    return None


def megatron_missing_half(path: str | Path) -> str | None:
    """ "PREFIX.bin is missing (PREFIX.idx exists)" when only one of the pair is there, else None."""
    prefix = _prefix_of(Path(path))
    idx, bin_ = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    if idx.is_file() != bin_.is_file():
        present, missing = (idx, bin_) if idx.is_file() else (bin_, idx)
        return f"{missing} is missing ({present} exists; a Megatron dataset needs both)"
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
    # Megatron's builder starts the document index at 0 and appends the sequence count after each document
    if n_doc and (docs[0] != 0 or np.any(np.diff(docs) < 0) or docs[-1] > n_seq):
        raise ManifestError(
            f"{idx_path}: document index is not a non-decreasing list from 0 to at most {n_seq} "
            f"(the sequence count); the index is damaged"
        )
    return MegatronIndex(
        idx_path,
        np.dtype(DTYPE_CODES[code]).newbyteorder("<"),
        np.asarray(sizes),
        np.asarray(pointers),
        np.asarray(docs),
    )


def index_digest(idx: MegatronIndex, tokens: int) -> str:
    """sha256 of what the index says of its data: token dtype, sequence, document and token counts, and the
    sizes of an even spread of DIGEST_SIZES sequences (another order of the documents shows there);
    hashing the whole index would read gigabytes of a large corpus at every start."""
    n = idx.sizes.size
    spread = np.asarray(idx.sizes[np.linspace(0, n - 1, min(n, DIGEST_SIZES)).astype(np.int64)], dtype="<i4")
    digest = hashlib.sha256(f"{idx.dtype.str}:{n}:{idx.document_indices.size}:{tokens}:".encode())
    digest.update(spread.tobytes())
    return digest.hexdigest()


def open_megatron_tokens(
    prefix: Path, eos_id: int | None, vocab_size: int | None = None
) -> tuple[np.memmap, MegatronIndex]:
    """Memory-map PREFIX.bin as one token stream after checking it against PREFIX.idx.

    The sequences must be stored back to back (they always are in Megatron's builder); if eos_id
    is given, documents must end with it (all checked, or an even spread of MAX_EOD_CHECKS); if
    vocab_size is given, token ids must lie in [0, vocab_size) (an even spread of blocks checked:
    data tokenized for another vocabulary fails here, not as an embedding index error on the GPU)."""
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
    if vocab_size is not None:
        _check_token_range(tokens, vocab_size, bin_path)
    if eos_id is not None and idx.document_indices.size > 1:
        doc_idx = idx.document_indices
        # non-empty documents first, then the spread: a mask over all documents does not fit a spread of them
        docs = np.flatnonzero(doc_idx[1:] > doc_idx[:-1])
        if docs.size > MAX_EOD_CHECKS:  # random reads: check an even spread, not all of billions
            docs = docs[np.linspace(0, docs.size - 1, MAX_EOD_CHECKS).astype(np.int64)]
        last_seq = doc_idx[docs + 1] - 1  # the sequence each document ends with
        ends = (idx.pointers[last_seq] // itemsize) + idx.sizes[last_seq]
        bad = np.flatnonzero(tokens[ends - 1] != eos_id)
        if bad.size:
            raise ManifestError(
                f"{idx.path}: {bad.size} of {docs.size} documents do not end with EOS id {eos_id} "
                f"(first: document {int(docs[bad[0]])}); tokenize with Megatron's --append-eod or pass the right eos_id"
            )
    return tokens, idx


def spread_starts(n: int) -> np.ndarray:
    """Starts of the RANGE_CHECK_BLOCKS blocks of RANGE_CHECK_BLOCK_TOKENS tokens whose ids are checked, spread
    evenly over n tokens (overlapping, and so covering them all, where n is shorter than the blocks)."""
    return np.unique(np.linspace(0, max(n - RANGE_CHECK_BLOCK_TOKENS, 0), RANGE_CHECK_BLOCKS).astype(np.int64))


def _check_token_range(tokens: np.ndarray, vocab_size: int, bin_path: Path) -> None:
    for start in spread_starts(tokens.size):
        check_token_ids(np.asarray(tokens[start : start + RANGE_CHECK_BLOCK_TOKENS]), vocab_size, bin_path, int(start))
