"""Input corpora as `datasets.Dataset`s with a single "text" column, one row per document.

A source spec is one of
  - a local file, a directory (all its files, recursively, but none named `.*` nor any inside a
    `.*` folder) or a glob: `.jsonl`/`.json` (JSON lines, text in `text_field`), `.parquet`
    (column `text_field`), anything else plain text (one document per file, or per line/paragraph
    with `text_unit`; universal newlines: `\\r\\n` and `\\r` become `\\n`, JSON and parquet texts
    are kept as they are); `.gz` files are read decompressed;
  - `hf:PATH[:CONFIG][@SPLIT]`: `datasets.load_dataset(PATH, CONFIG, split=SPLIT)` (hub name,
    local dataset directory or loading script; SPLIT defaults to "train");
  - `disk:PATH`: a dataset saved with `Dataset.save_to_disk`.
Files are sorted so the document order (and with it every shard) is reproducible.

Rows without text: a row whose text is missing, null or not a string is an error naming the file
and line (JSON) or the row; an empty string is not a document and is skipped by every tool; a
corpus with no text at all is an error. `check_text_column` is that rule, for every tool.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_UNITS = ("document", "line", "paragraph")
DECODE_ERROR_ACTIONS = ("error", "skip")


class SourceError(ValueError):
    """An input corpus is missing, empty, undecodable or lacks the text field."""


@dataclass
class Source:
    """A named corpus. `files` are the files that will be read: for a spec resolved by
    `parse_source`, every one passed `check_text_file` or `check_json_file` (parquet is Arrow's);
    `skipped` lists the ones left out under on_decode_error="skip", as {"path", "reason"}."""

    name: str
    spec: str  # as given by the user; recorded in the manifest for provenance
    files: list[Path] = field(default_factory=list)  # empty for hf:/disk: sources
    text_field: str = "text"
    text_unit: str = "document"
    skipped: list[dict] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "spec": self.spec,
            "text_field": self.text_field,
            "text_unit": self.text_unit,
            "files": [{"path": str(p), "bytes": p.stat().st_size} for p in self.files],
            "skipped_files": self.skipped,
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
        files = _visible_files(path)
        if not files:
            raise SourceError(f"{spec}: directory contains no files (hidden ones, named '.*', are left out)")
        return files
    if glob.has_magic(spec):
        return _glob_files(spec)
    raise SourceError(f"{spec}: no such file or directory")


def _glob_files(spec: str) -> list[Path]:
    """The files a glob matches, sorted. The directories it matches are read only where the glob also
    matches files below them (`DIR/**`); the others are named, never dropped without a word."""
    matches = [Path(p) for p in glob.glob(spec, recursive=True)]
    files = sorted(p for p in matches if p.is_file())
    holding_files = {parent for f in files for parent in f.parents}
    skipped = [p for p in matches if p.is_dir() and p not in holding_files]
    hint = f"a glob reads files; {spec.rstrip('/')}/** reads the files below them"
    if not files:
        dirs = f"{len(skipped)} directories and " if skipped else ""
        raise SourceError(f"{spec}: glob matches {dirs}no files" + (f" ({hint})" if skipped else ""))
    if skipped:
        print(f"warning: {spec}: glob also matches {len(skipped)} directories, whose files are left out ({hint})")
    return files


def _visible_files(directory: Path) -> list[Path]:
    """The files below `directory`, sorted, leaving out hidden files and everything in hidden folders:
    a checkout's .git objects or a tool's .cache are not part of a corpus."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned: never walked into
        files.extend(Path(root) / name for name in names if not name.startswith("."))
    return sorted(p for p in files if p.is_file())


class UndecodableFile(SourceError):
    """A file that is not valid UTF-8 text (or not a valid .gz): skippable, unlike other SourceErrors."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def _open_binary(path: Path) -> BinaryIO:
    """A file's bytes, decompressed for .gz (which datasets reads decompressed too)."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def parse_source(
    arg: str, text_field: str = "text", text_unit: str = "document", on_decode_error: str = "error"
) -> Source:
    """`NAME=SPEC` (or just SPEC, named after the file/dir stem) -> Source, files resolved and screened:
    a file that is not valid UTF-8 (or a damaged .gz) is an error naming it, or with
    on_decode_error="skip" is left out and listed in `Source.skipped`."""
    name, sep, spec = arg.partition("=")
    if not sep or name.startswith(("hf:", "disk:")) or os.sep in name:
        name, spec = "", arg
    if text_unit not in TEXT_UNITS:
        raise SourceError(f"text_unit {text_unit!r} is not one of {TEXT_UNITS}")
    if on_decode_error not in DECODE_ERROR_ACTIONS:
        raise SourceError(f"on_decode_error {on_decode_error!r} is not one of {DECODE_ERROR_ACTIONS}")
    if name in (".", ".."):  # the name is a directory under the output root
        raise SourceError(f"source name {name!r} in {arg!r} is not a directory name; choose another NAME=")
    if spec.startswith(("hf:", "disk:")):
        name = name or spec.split(":", 1)[1].rstrip("/").split("/")[-1].split("@")[0].split(":")[0]
        return Source(name, spec, [], text_field, text_unit)
    name = name or Path(spec.rstrip("/")).name.split(".")[0].replace("*", "") or "corpus"
    files, skipped = [], []
    for path in resolve_files(spec):
        try:
            if _file_kind(path) == "json":
                check_json_file(path, text_field)
            elif _file_kind(path) == "text":
                check_text_file(path)  # parquet strings are validated UTF-8 by Arrow
        except UndecodableFile as e:
            if on_decode_error == "error":
                raise SourceError(f"{e}; pass --on-decode-error skip to leave such files out") from None
            skipped.append({"path": str(path), "reason": e.reason})
        else:
            files.append(path)
    if not files:
        raise SourceError(
            f"source {name!r} ({spec}): no readable files (all {len(skipped)} were skipped: not valid UTF-8 text)"
        )
    return Source(name, spec, files, text_field, text_unit, skipped)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A damaged .gz is an undecodable file; an unreadable one (permissions) an error naming it."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UndecodableFile(path, f"not a valid gzip file ({e})") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot be read ({e.strerror or e})") from None


def check_text_file(path: Path, chunk_bytes: int = 1 << 22) -> None:
    """Stream-decode a file so undecodable bytes fail here, naming the file and byte offset,
    instead of deep inside a datasets worker."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _reading(path), _open_binary(path) as f:
        while True:
            block = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise UndecodableFile(path, f"not valid UTF-8 at byte {at} ({e.reason})") from None
            if not block:
                return
            offset += len(block)


def check_json_file(path: Path, text_field: str) -> None:
    """`check_text_file` for JSON, which also needs every record to be an object whose text field
    is a string: else a SourceError naming `path:line`. Unchecked, datasets fails with a long
    traceback, or casts a number in the text field to a string without a word."""
    with _reading(path):
        for where, record in _json_records(path):
            problem = _record_problem(record, text_field)
            if problem:
                raise SourceError(f"{where}: {problem}")


def _record_problem(record: Any, text_field: str) -> str | None:
    if isinstance(record, json.JSONDecodeError):
        return f"not valid JSON ({record.msg.removesuffix(' at')} at column {record.colno})"
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    if text_field not in record:
        return f"no field {text_field!r} (fields: {sorted(record)}; --text-field names the text field)"
    value = record[text_field]
    if not isinstance(value, str):
        return f"field {text_field!r} is {'null' if value is None else type(value).__name__}, expected a string"
    return None


def _decode(path: Path, data: bytes, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UndecodableFile(path, f"not valid UTF-8 at byte {offset + e.start} ({e.reason})") from None


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(`path:line`, record or its JSONDecodeError) for a JSON-lines file; a file holding one JSON
    array (datasets reads that too) gives (`path: record i`, record)."""
    with _open_binary(path) as f:
        starts_as_array = f.read(1 << 16).lstrip().startswith(b"[")
    if starts_as_array:
        with _open_binary(path) as f:
            try:
                records = json.loads(_decode(path, f.read(), 0))
            except json.JSONDecodeError:
                records = None  # not one array after all: the line-by-line pass names the fault
        if isinstance(records, list):
            yield from ((f"{path}: record {i}", r) for i, r in enumerate(records))
            return
    offset = 0
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            text = _decode(path, line, offset)
            offset += len(line)
            if not text.strip():
                continue  # datasets skips blank lines too
            try:
                yield f"{path}:{lineno}", json.loads(text)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", e


def report_skipped(source: Source, recorded_in: str) -> None:
    """Say which files on_decode_error="skip" left out: skipping is never silent."""
    if source.skipped:
        listed = ", ".join(s["path"] for s in source.skipped[:5]) + (" ..." if len(source.skipped) > 5 else "")
        print(
            f"warning: source {source.name!r}: skipped {len(source.skipped)} files that are not valid UTF-8 text "
            f"(--on-decode-error skip; {recorded_in} lists them): {listed}"
        )


def load_source(source: Source, cache_dir: str | None = None) -> datasets.Dataset:
    """Load a source as a Dataset with exactly one column, "text", that passed `check_text_column`."""
    if source.spec.startswith("disk:"):
        path = source.spec[len("disk:") :]
        if not Path(path).exists():
            raise SourceError(f"{path}: no such dataset directory (source {source.name!r})")
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:  # a directory, but not one save_to_disk wrote
            raise SourceError(f"{path}: not a dataset saved with save_to_disk (source {source.name!r}): {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            raise SourceError(f"{path}: is a DatasetDict with splits {list(ds)}; save one split")
    elif source.spec.startswith("hf:"):
        rest, _, split = source.spec[len("hf:") :].partition("@")
        path, _, config = rest.partition(":")
        try:
            ds = datasets.load_dataset(path, config or None, split=split or "train", cache_dir=cache_dir)
        except Exception as e:  # hub/network/script errors come in many types; name the source
            raise SourceError(
                f"source {source.name!r} ({source.spec}): datasets.load_dataset failed: {_root_cause(e)}"
            ) from None
    else:
        ds = _load_files(source, cache_dir)
        if _file_kind(source.files[0]) == "text":
            check_text_column(ds, source)  # the text builder always names its one column "text"
            return ds
    if source.text_field not in ds.column_names:
        raise SourceError(
            f"source {source.name!r} ({source.spec}): no text field {source.text_field!r}; "
            f"columns are {ds.column_names}"
        )
    ds = ds.select_columns([source.text_field])
    if source.text_field != "text":
        ds = ds.rename_column(source.text_field, "text")
    check_text_column(ds, source)
    return ds


def _load_files(source: Source, cache_dir: str | None) -> datasets.Dataset:
    kinds = {_file_kind(p) for p in source.files}
    if len(kinds) > 1:
        raise SourceError(
            f"source {source.name!r} ({source.spec}) mixes file types {sorted(kinds)}; give one source per type"
        )
    kind = kinds.pop()
    # zero-byte files hold no documents (and crash datasets' JSON schema inference)
    files = [p for p in source.files if p.stat().st_size > 0]
    if not files:
        raise SourceError(
            f"source {source.name!r} ({source.spec}): empty corpus (all {len(source.files)} files are empty)"
        )
    kwargs = {"sample_by": source.text_unit} if kind == "text" else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log of a bad file repeats the error below
    try:
        ds = datasets.load_dataset(
            kind, data_files=[str(p) for p in files], split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as e:  # datasets wraps the reader's error; name the file (and line) instead
        fault = _unreadable_parquet(files) if kind == "parquet" else None
        raise SourceError(fault or f"source {source.name!r} ({source.spec}): {_root_cause(e)}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return ds


def check_text_column(ds: datasets.Dataset, source: Source) -> None:
    """The one rule for rows without text (see the module docstring), applied to the "text" column."""
    where = f"source {source.name!r} ({source.spec})"
    if len(ds) == 0:
        raise SourceError(f"{where}: empty corpus (0 documents)")
    column = ds.data.column("text")
    bad_type = not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type))
    if bad_type or column.null_count:  # JSON files were checked record by record already: other sources
        if bad_type:
            raise SourceError(f"{where}: text field {source.text_field!r} has type {column.type}, expected strings")
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise SourceError(
            f"{where}: {column.null_count} documents have no text (null {source.text_field!r}; first: row {first})"
        )
    if pc.max(pc.utf8_length(column)).as_py() == 0:
        raise SourceError(f"{where}: empty corpus (no text in any document)")


def _root_cause(e: BaseException) -> str:
    """The innermost exception of a chain: datasets' own wrapper says only "an error occurred"."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"


def _unreadable_parquet(files: list[Path]) -> str | None:
    """`path: problem` for the first parquet file Arrow cannot open, or None."""
    for path in files:
        try:
            pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            return f"{path}: not a readable parquet file ({e})"
    return None


def add_reading_args(parser, skipped_listed_in: str) -> None:
    """The options that say how the --source files are read (both data_prep commands)."""
    parser.add_argument(
        "--text-field", default="text", help="the text's key in .jsonl/.json, its column in .parquet (default: text)"
    )
    parser.add_argument(
        "--text-unit",
        default="document",
        choices=TEXT_UNITS,
        help="a plain-text file's documents: the whole file, each line or each paragraph (default: document)",
    )
    parser.add_argument(
        "--on-decode-error",
        default="error",
        choices=DECODE_ERROR_ACTIONS,
        help=f"a file that is not valid UTF-8 text: stop naming it, or skip it (listed in the {skipped_listed_in}; "
        "default: error)",
    )


def sources_from_args(args) -> list[Source]:
    """The parsed --source options (add_reading_args' options say how to read them)."""
    return [parse_source(s, args.text_field, args.text_unit, args.on_decode_error) for s in args.source]
