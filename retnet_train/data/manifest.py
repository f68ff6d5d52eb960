"""The token-shard manifest: one JSON file per source directory, written by data_prep.tokenize.

It is the single description of a shard directory that both the writer and the loader trust:
tokenizer identity (sha256, vocab size, special ids), the token dtype, and per split the shard
files with their token counts, document counts and sha256. Everything here is plain data so the
format can be read without importing data_prep (the trainer only needs this package).
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "retnet-train-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class ManifestError(ValueError):
    """A manifest or shard file is missing, malformed, corrupt or does not match the model."""


class TokenizerMismatch(ManifestError):
    """Shards tokenized with another tokenizer than the expected one: `path` (the manifest), `found` (its
    tokenizer sha256) and `expected`, for a caller that knows where the expected one came from."""

    def __init__(self, path: Path, found: str, expected: str):
        super().__init__(
            f"{path}: shards were tokenized with tokenizer sha256 {found[:12]}..., "
            f"but the expected tokenizer has sha256 {expected[:12]}..."
        )
        self.path, self.found, self.expected = path, found, expected


def check_token_ids(ids: np.ndarray, vocab_size: int, path: Path, offset: int = 0) -> None:
    """ids, the tokens of `path` from position `offset` on, must lie in [0, vocab_size): else an error
    naming the file, the position and the id."""
    if not ids.size or 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
        return
    at = int(np.argmax((ids < 0) | (ids >= vocab_size)))
    raise ManifestError(
        f"{path}: token id {int(ids[at])} at position {offset + at} is outside the model's "
        f"vocabulary [0, {vocab_size}); was it tokenized with another tokenizer?"
    )


def token_dtype_for(vocab_size: int) -> str:
    """Smallest flat dtype that holds every id (uint16 halves disk and page-cache use)."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the manifest's directory
    tokens: int
    documents: int  # number of EOS tokens in the shard (documents that end in it)
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    tokens: int
    documents: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest.json. `directory` is where the shard files live."""

    directory: Path
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int
    unk_id: int
    tokenizer_sha256: str
    dtype: str
    shard_tokens: int
    splits: dict[str, SplitInfo]
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: source spec, split seed, ...

    @property
    def path(self) -> Path:
        return self.directory / MANIFEST_NAME

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.directory / s.file for s in self.split(split).shards]

    @property
    def add_bos(self) -> bool:
        """Whether every document starts with BOS (data_prep.tokenize --bos); absent: it does not."""
        return self.extra.get("add_bos", False)

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise ManifestError(f"{self.path}: no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def split_digest(self, split: str) -> str:
        """sha256 of the split's token dtype and its shards' recorded sha256s in order: the same data has the same
        digest wherever it lies, whatever its file names and provenance."""
        canonical = {"dtype": self.dtype, "shards": [s.sha256 for s in self.split(split).shards]}
        return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()

    def check_tokenizer(self, tokenizer_sha256: str | None = None, vocab_size: int | None = None) -> None:
        """Refuse shards made with another tokenizer than the model/tokenizer in use."""
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ManifestError(
                f"{self.path}: shards have vocab_size {self.vocab_size}, but the model expects {vocab_size} "
                f"(model.vocab_size: set it to {self.vocab_size}, or point data.paths at shards of its tokenizer)"
            )
        if tokenizer_sha256 is not None and tokenizer_sha256 != self.tokenizer_sha256:
            raise TokenizerMismatch(self.path, self.tokenizer_sha256, tokenizer_sha256)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tokenizer": {
                "sha256": self.tokenizer_sha256,
                "vocab_size": self.vocab_size,
                "eos_id": self.eos_id,
                "bos_id": self.bos_id,
                "pad_id": self.pad_id,
                "unk_id": self.unk_id,
            },
            "dtype": self.dtype,
            "shard_tokens": self.shard_tokens,
            "splits": {
                name: {"tokens": s.tokens, "documents": s.documents, "shards": [asdict(x) for x in s.shards]}
                for name, s in self.splits.items()
            },
            **self.extra,
        }


def _require(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise ManifestError(f"{path}: {msg}")


def _int(d: dict, key: str, path: Path, minimum: int = 0, within: str = "", note: str = "") -> int:
    """d[key], an integer >= minimum; an error names the key by its full path (`within` + key) and `note`."""
    value = d.get(key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        path,
        f"key {within + key!r} must be an integer >= {minimum}, got {value!r}{note}",
    )
    return value


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in string.hexdigits for c in value)


def parse_manifest(data: Any, directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    _check_format(data, path)
    sha, vocab_size, ids = _parse_tokenizer(data.get("tokenizer"), path)
    dtype = data.get("dtype")
    _require(dtype in DTYPES, path, f"key 'dtype' is {dtype!r}, expected one of {sorted(DTYPES)}")
    _require(vocab_size <= np.iinfo(DTYPES[dtype]).max + 1, path, f"vocab_size {vocab_size} does not fit dtype {dtype}")
    splits = _parse_splits(data.get("splits"), path)
    add_bos = data.get("add_bos", False)
    _require(isinstance(add_bos, bool), path, f"key 'add_bos' must be true or false, got {add_bos!r}")
    _require(not add_bos or ids["bos_id"] >= 0, path, "key 'add_bos' is true, but key 'tokenizer.bos_id' is -1 (none)")
    known = {"format", "format_version", "tokenizer", "dtype", "shard_tokens", "splits"}
    return Manifest(
        directory=directory,
        vocab_size=vocab_size,
        tokenizer_sha256=sha,
        dtype=dtype,
        shard_tokens=_int(data, "shard_tokens", path, 1),
        splits=splits,
        extra={k: v for k, v in data.items() if k not in known},
        **ids,
    )


def _check_format(data: Any, path: Path) -> None:
    _require(isinstance(data, dict), path, "top level is not a JSON object")
    _require(
        data.get("format") == FORMAT_NAME, path, f"key 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}"
    )
    _require(
        data.get("format_version") == FORMAT_VERSION,
        path,
        f"format_version {data.get('format_version')!r} is not supported (this reader knows {FORMAT_VERSION})",
    )


def _parse_tokenizer(tok: Any, path: Path) -> tuple[str, int, dict[str, Any]]:
    """The tokenizer section: (sha256, vocab size, {eos_id, bos_id, pad_id, unk_id}; -1 where absent)."""
    _require(isinstance(tok, dict), path, "key 'tokenizer' missing or not an object")
    sha = tok.get("sha256")
    _require(isinstance(sha, str) and len(sha) == 64, path, "key 'tokenizer.sha256' is not a sha256 hex digest")
    vocab_size = _int(tok, "vocab_size", path, 1, within="tokenizer.")
    ids = {k: _special_id(tok, k, vocab_size, path) for k in ("eos_id", "bos_id", "pad_id", "unk_id")}
    return sha, vocab_size, ids


def _special_id(tok: dict, key: str, vocab_size: int, path: Path) -> int:
    """A special token's id: below vocab_size, or -1 (sentencepiece's "none", also when absent) but for EOS,
    which separates documents. Framing and prompts use it as a token: a string, float or bool is refused."""
    value, lowest = tok.get(key, -1), 0 if key == "eos_id" else -1
    allowed = f"an id below vocab_size {vocab_size}" + (" or -1 (none)" if lowest < 0 else "")
    _require(
        isinstance(value, int) and not isinstance(value, bool) and lowest <= value < vocab_size,
        path,
        f"key 'tokenizer.{key}' must be {allowed}, got {value!r}",
    )
    return value


def _parse_splits(splits_raw: Any, path: Path) -> dict[str, SplitInfo]:
    _require(isinstance(splits_raw, dict) and "train" in splits_raw, path, "key 'splits' missing or has no 'train'")
    listed: dict[str, str] = {}  # file -> where it is listed: a file listed twice is read twice (or in both splits)
    return {name: _parse_split(name, raw, path, listed) for name, raw in splits_raw.items()}


def _parse_split(name: str, raw: Any, path: Path, listed: dict[str, str]) -> SplitInfo:
    _require(name in SPLITS, path, f"split {name!r} is not one of {SPLITS}")
    _require(isinstance(raw, dict), path, f"key 'splits.{name}' must be an object, got {raw!r}")
    entries = raw.get("shards", [])
    _require(
        isinstance(entries, list), path, f"key 'splits.{name}.shards' must be a list of shard entries, got {entries!r}"
    )
    shards = tuple(_parse_shard(s, f"splits.{name}.shards[{i}]", path, listed) for i, s in enumerate(entries))
    within = f"splits.{name}."
    split = SplitInfo(_int(raw, "tokens", path, within=within), _int(raw, "documents", path, within=within), shards)
    _require(split.tokens == sum(s.tokens for s in shards), path, f"splits.{name}.tokens != sum of its shards")
    return split


def _parse_shard(s: Any, where: str, path: Path, listed: dict[str, str]) -> ShardInfo:
    """One shard entry; `listed` (file -> where) gains it, and refuses a file listed before."""
    _require(isinstance(s, dict) and isinstance(s.get("file"), str), path, f"{where}.file missing")
    _require(os.sep not in s["file"] and "/" not in s["file"], path, f"{where}.file must be a plain file name")
    _require(s["file"] not in listed, path, f"{where}.file {s['file']!r} is also {listed.get(s['file'])}")
    listed[s["file"]] = where
    within, note = f"{where}.", f" (shard {s['file']!r})"  # a manifest lists many shards: name this one
    _require(_is_sha256(s.get("sha256")), path, f"key '{where}.sha256' is not a sha256 hex digest{note}")
    tokens = _int(s, "tokens", path, 1, within, note)
    return ShardInfo(s["file"], tokens, _int(s, "documents", path, 0, within, note), s["sha256"])


def _shard_dirs_below(directory: Path) -> str:
    """data_prep.tokenize writes one shard directory per source under --out: name them when the root was given."""
    below = sorted(str(d) for d in directory.glob(f"*/{MANIFEST_NAME}")) if directory.is_dir() else []
    if not below:
        return ""
    more = f" and {len(below) - 5} more" if len(below) > 5 else ""
    return f"; shard directories below it: {', '.join(str(Path(m).parent) for m in below[:5])}{more}"


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and validate `<directory>/manifest.json` (no shard I/O; see verify_shards)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path}: no manifest (is {directory} a shard directory written by data_prep.tokenize?)"
            + _shard_dirs_below(directory)
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    return parse_manifest(data, directory)


def verify_shards(manifest: Manifest, checksums: bool = True, splits: tuple[str, ...] | None = None) -> list[str]:
    """Return one message per bad shard (missing, wrong size, wrong sha256); empty when all is well."""
    problems = []
    for name in splits or tuple(manifest.splits):
        for i, shard in enumerate(manifest.split(name).shards):
            # the shard file, and the manifest entry that describes it (its index, to find it in a long list)
            problem = _shard_problem(manifest, shard, f"{manifest.path} splits.{name}.shards[{i}]", checksums)
            if problem:
                problems.append(problem)
    return problems


def _shard_problem(manifest: Manifest, shard: ShardInfo, entry: str, checksums: bool) -> str | None:
    path = manifest.directory / shard.file
    if not path.is_file():
        return f"{path}: missing (listed in {entry})"
    size, expected = path.stat().st_size, shard.tokens * manifest.np_dtype.itemsize
    if size != expected:
        return f"{path}: size {size} bytes, but {entry} says {shard.tokens} {manifest.dtype} tokens ({expected} bytes)"
    if checksums and (digest := sha256_file(path)) != shard.sha256:
        return f"{path}: sha256 {digest[:12]}... does not match {shard.sha256[:12]}... in {entry}"
    return None
