"""Writes one split's token stream as fixed-size shards, resumably.

Shard k of a split holds tokens [k * shard_tokens, (k + 1) * shard_tokens) of that split's stream
(documents in corpus order, each followed by EOS), so shards are a pure function of the input and
settings. Each finished shard is written under a temporary name, recorded in a journal
(`progress.jsonl`) together with its sha256 and the *resume point* (the document index and token
offset of the first token after it), and only then renamed: every shard file that exists under its
final name is in the journal, so a re-run can tell its own files from anyone else's. A re-run keeps
the journaled shards whose checksum still matches and restarts tokenization from the earliest
resume point instead of from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.atomic import write_bytes_atomic
from retnet_train.data.manifest import ShardInfo, SplitInfo, sha256_file

JOURNAL_NAME = "progress.jsonl"


def shard_file_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


@dataclass(frozen=True)
class ResumePoint:
    doc: int  # global document index (corpus order) of the next token to write
    offset: int  # tokens of that document already written


class Journal:
    """Append-only log of finished shards. The first line fingerprints the settings: a journal
    from other settings must not be resumed (its shards would be a different stream)."""

    def __init__(self, directory: Path, fingerprint: str):
        self.path = directory / JOURNAL_NAME
        self.fingerprint = fingerprint

    def read(self) -> list[dict]:
        """Finished-shard records of a previous run with the same settings ([] if none)."""
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            return []  # killed while writing the header: nothing was journaled
        if header.get("fingerprint") != self.fingerprint:
            raise FileExistsError(
                f"{self.path}: an unfinished run with different inputs or settings wrote here; "
                "pass --overwrite to discard it"
            )
        for line in lines[1:]:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a kill: everything after it is unrecorded
        return records

    def recorded_files(self) -> set[str]:
        """Every shard file the journal names, whatever run wrote it (read leniently: used to
        decide what may be deleted, never to resume)."""
        if not self.path.exists():
            return set()
        files = set()
        for line in self.path.read_text(encoding="utf-8", errors="replace").split("\n")[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                files.add(record["file"])
        return files

    def start(self, kept: list[dict]) -> None:
        """Rewrite the journal with only the shards being kept (atomically), then append."""
        text = json.dumps({"fingerprint": self.fingerprint}) + "\n" + "".join(json.dumps(r) + "\n" for r in kept)
        write_bytes_atomic(self.path, text.encode("utf-8"))

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def verified_prefix(directory: Path, split: str, records: list[dict], itemsize: int) -> list[dict]:
    """The journaled shards 0, 1, ... of `split` whose files are intact, up to the first bad one."""
    kept = []
    for record in sorted((r for r in records if r["split"] == split), key=lambda r: r["index"]):
        path = directory / record["file"]
        if record["index"] != len(kept) or not path.is_file():
            break
        if path.stat().st_size != record["tokens"] * itemsize or sha256_file(path) != record["sha256"]:
            break
        kept.append(record)
    return kept


class SplitShardWriter:
    def __init__(
        self,
        directory: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        eos_id: int,
        journal: Journal,
        kept: list[dict],
    ):
        self.directory, self.split, self.dtype = directory, split, np.dtype(dtype)
        self.shard_tokens, self.eos_id, self.journal = shard_tokens, eos_id, journal
        self.shards = [ShardInfo(r["file"], r["tokens"], r["documents"], r["sha256"]) for r in kept]
        # where the stream continues: after the last kept shard, or at the very beginning
        self.resume = ResumePoint(*kept[-1]["resume"]) if kept else ResumePoint(0, 0)
        self._tokens: list[np.ndarray] = []
        self._buffered = 0
        self._doc_ids: list[np.ndarray] = []  # documents (global indices) whose tokens are buffered
        self._doc_ends: list[np.ndarray] = []  # their end positions, relative to the buffer start
        self._first_doc_written = self.resume.offset  # tokens of the first buffered doc already in shards

    def add(self, tokens: np.ndarray, doc_ids: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents (already EOS-terminated, concatenated in `tokens`) of this split,
        in increasing document order. Whatever lies before the resume point is already on disk."""
        skip = self.resume
        if doc_ids.size and doc_ids[0] <= skip.doc:
            keep = doc_ids >= skip.doc
            tokens = tokens[np.repeat(keep, doc_lengths)]
            doc_ids, doc_lengths = doc_ids[keep], doc_lengths[keep]
            if doc_ids.size and doc_ids[0] == skip.doc and skip.offset:
                # the document that the last kept shard cut through: drop its head
                tokens = tokens[skip.offset :]
                doc_lengths = doc_lengths.copy()
                doc_lengths[0] -= skip.offset
        if not tokens.size:
            return
        self._tokens.append(tokens.astype(self.dtype, copy=False))
        self._doc_ids.append(doc_ids)
        self._doc_ends.append(self._buffered + np.cumsum(doc_lengths))
        self._buffered += tokens.size
        while self._buffered >= self.shard_tokens:
            self._write_shard(self.shard_tokens)

    def finish(self) -> SplitInfo:
        if self._buffered:
            self._write_shard(self._buffered)
        return SplitInfo(sum(s.tokens for s in self.shards), sum(s.documents for s in self.shards), tuple(self.shards))

    def _write_shard(self, n: int) -> None:
        buf = np.concatenate(self._tokens)
        doc_ids, doc_ends = np.concatenate(self._doc_ids), np.concatenate(self._doc_ends)
        data = buf[:n]
        name = shard_file_name(self.split, len(self.shards))
        payload = data.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        info = ShardInfo(name, int(n), int(np.count_nonzero(data == self.eos_id)), hashlib.sha256(payload).hexdigest())
        # the first token after this shard lies in buffered document k
        k = int(np.searchsorted(doc_ends, n, side="right"))
        if k < doc_ids.size:
            doc_start = doc_ends[k - 1] if k else -self._first_doc_written
            resume = ResumePoint(int(doc_ids[k]), int(n - doc_start))
            self._first_doc_written = int(n - doc_start)
        else:
            resume = ResumePoint(int(doc_ids[-1]) + 1, 0)
            self._first_doc_written = 0
        record = {"split": self.split, "index": len(self.shards), **asdict(info), "resume": [resume.doc, resume.offset]}
        write_bytes_atomic(self.directory / name, payload, before_rename=lambda: self.journal.append(record))
        self.shards.append(info)
        self._tokens = [buf[n:]]
        self._doc_ids, self._doc_ends = [doc_ids[k:]], [doc_ends[k:] - n]
        self._buffered -= n
