"""Input corpora as `datasets.Dataset`s with a single "text" column, one row per document.

A source spec is one of
  - a local file, a directory (all its files, recursively) or a glob: `.jsonl`/`.json` (JSON lines,
    text in `text_field`), `.parquet` (column `text_field`), anything else plain text (one
    document per file, or per line/paragraph with `text_unit`);
  - `hf:PATH[:CONFIG][@SPLIT]`: `datasets.load_dataset(PATH, CONFIG, split=SPLIT)` (hub name,
    local dataset directory or loading script; SPLIT defaults to "train");
  - `disk:PATH`: a dataset saved with `Dataset.save_to_disk`.
Files are sorted so the document order (and with it every shard) is reproducible.
"""
from __future__ import annotations

import codecs
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_UNITS = ("document", "line", "paragraph")


class SourceError(ValueError):
    """An input corpus is missing, empty, undecodable or lacks the text field."""


@dataclass
class Source:
    name: str
    spec: str  # as given by the user; recorded in the manifest for provenance
    files: list[Path] = field(default_factory=list)  # empty for hf:/disk: sources
    text_field: str = "text"
    text_unit: str = "document"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "spec": self.spec,
            "text_field": self.text_field,
            "text_unit": self.text_unit,
            "files": [{"path": str(p), "bytes": p.stat().st_size} for p in self.files],
        }


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def resolve_files(spec: str) -> list[Path]:
    """Expand a file / directory / glob spec to a sorted list of files, or raise naming the spec."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise SourceError(f"{spec}: directory contains no files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise SourceError(f"{spec}: glob matches no files")
        return files
    raise SourceError(f"{spec}: no such file or directory")


def parse_source(arg: str, text_field: str = "text", text_unit: str = "document") -> Source:
    """`NAME=SPEC` (or just SPEC, named after the file/dir stem) -> Source, files resolved."""
    name, sep, spec = arg.partition("=")
    if not sep or name.startswith(("hf:", "disk:")) or os.sep in name:
        name, spec = "", arg
    if text_unit not in TEXT_UNITS:
        raise SourceError(f"text_unit {text_unit!r} is not one of {TEXT_UNITS}")
    if spec.startswith(("hf:", "disk:")):
        name = name or spec.split(":", 1)[1].rstrip("/").split("/")[-1].split("@")[0].split(":")[0]
        return Source(name, spec, [], text_field, text_unit)
    files = resolve_files(spec)
    name = name or Path(spec.rstrip("/")).name.split(".")[0].replace("*", "") or "corpus"
    return Source(name, spec, files, text_field, text_unit)


def check_utf8(path: Path, chunk_bytes: int = 1 << 22) -> None:
    """Stream-decode a file so undecodable bytes fail here, naming the file and byte offset,
    instead of deep inside a datasets worker."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise SourceError(f"{path}: not valid UTF-8 at byte {offset + e.start} ({e.reason})") from None
            if not block:
                return
            offset += len(block)


def load_source(source: Source, cache_dir: str | None = None) -> datasets.Dataset:
    """Load a source as a Dataset with exactly one column, "text"."""
    if source.spec.startswith("disk:"):
        path = source.spec[len("disk:"):]
        if not Path(path).exists():
            raise SourceError(f"{path}: no such dataset directory (source {source.name!r})")
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise SourceError(f"{path}: is a DatasetDict with splits {list(ds)}; save one split")
    elif source.spec.startswith("hf:"):
        rest, _, split = source.spec[len("hf:"):].partition("@")
        path, _, config = rest.partition(":")
        try:
            ds = datasets.load_dataset(path, config or None, split=split or "train", cache_dir=cache_dir)
        except Exception as e:  # hub/network/script errors come in many types; name the source
            raise SourceError(f"source {source.name!r} ({source.spec}): datasets.load_dataset failed: "
                              f"{type(e).__name__}: {e}") from e
    else:
        kinds = {_file_kind(p) for p in source.files}
        if len(kinds) > 1:
            raise SourceError(f"source {source.name!r} ({source.spec}) mixes file types {sorted(kinds)}; give one source per type")
        kind = kinds.pop()
        for path in source.files:
            # parquet strings are validated UTF-8 by Arrow; compressed files are checked by their reader
            if kind != "parquet" and not path.name.endswith(".gz"):
                check_utf8(path)
        # zero-byte files hold no documents (and crash datasets' JSON schema inference)
        files = [str(p) for p in source.files if p.stat().st_size > 0]
        if not files:
            raise SourceError(f"source {source.name!r} ({source.spec}): empty corpus (all {len(source.files)} files are empty)")
        kwargs = {"sample_by": source.text_unit} if kind == "text" else {}
        ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
        if kind == "text":
            return _require_rows(ds, source)  # the text builder always names its column "text"
    if source.text_field not in ds.column_names:
        raise SourceError(
            f"source {source.name!r} ({source.spec}): no text field {source.text_field!r}; columns are {ds.column_names}"
        )
    ds = ds.select_columns([source.text_field])
    if source.text_field != "text":
        ds = ds.rename_column(source.text_field, "text")
    return _require_rows(ds, source)


def _require_rows(ds: datasets.Dataset, source: Source) -> datasets.Dataset:
    if len(ds) == 0:
        raise SourceError(f"source {source.name!r} ({source.spec}): empty corpus (0 documents)")
    return ds
