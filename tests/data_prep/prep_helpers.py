"""Shared inputs for data_prep tests: a small real corpus, a tokenizer trained on it, and ways to run and
kill tokenize."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np

import data_prep.shard_writer as shard_writer
from data_prep.sources import Source, parse_source
from data_prep.tokenize import tokenize_source
from data_prep.train_tokenizer import train_tokenizer
from retnet_train.data import Manifest

# the awkward cases for a lossless round trip, next to real code
SPECIAL_DOCS = [
    "  leading spaces, trailing spaces   \n\n\ttabs\tand\r\nCRLF\r\n",
    "Unicode: naïve café, Ελληνικά, 日本語のテキスト, emoji 🚀🧪, combining é, zero-width\u200bspace",
    "",  # empty: not a document, must not produce a lone EOS
    "x",
    "def f(x):\n    return x  # a comment\n" * 50,
]


def stdlib_texts(n_files: int = 30) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        if len(texts) == n_files:
            break
    return texts


def corpus_texts() -> list[str]:
    texts = stdlib_texts()
    # interleave the special docs so both splits and shard edges see them
    for i, doc in enumerate(SPECIAL_DOCS):
        texts.insert(3 * i + 1, doc)
    return texts


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return path


def make_tokenizer(directory: Path, vocab_size: int = 1000):
    corpus = write_jsonl(directory / "tok_corpus.jsonl", corpus_texts())
    return train_tokenizer(
        [parse_source(str(corpus))],
        directory / "tokenizer.model",
        vocab_size=vocab_size,
        num_docs=1000,
        cache_dir=str(directory / "hf_cache"),
    )


def read_split_docs(directory: Path, split: str, eos_id: int, dtype=np.uint16) -> list[np.ndarray]:
    """All documents of a split, by reading the shard files in order and cutting at EOS."""
    files = sorted(directory.glob(f"{split}_*.bin"))
    if not files:
        return []
    stream = np.concatenate([np.fromfile(f, dtype=dtype) for f in files])
    assert stream[-1] == eos_id, "the split must end with a complete document"
    cuts = np.flatnonzero(stream == eos_id)
    return np.split(stream, cuts + 1)[:-1]


def jsonl_source(path: Path, name: str = "corpus") -> Source:
    return parse_source(f"{name}={path}")


def tokenize_quietly(source: Source, tok, out: Path, cache_dir: Path, **settings) -> Manifest:
    """tokenize_source without its progress bar, its datasets cache in `cache_dir`."""
    return tokenize_source(source, tok, out, progress=False, cache_dir=str(cache_dir), **settings)


def tokenize_argv(tok, out: Path, *sources, **options) -> list[str]:
    """data_prep.tokenize's command line: each source after its own --source, then `num_proc=1` as `--num-proc 1`."""
    argv = ["--tokenizer", str(tok.path), "--out", str(out)]
    for source in sources:
        argv += ["--source", str(source)]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


class Killed(Exception):
    """Stands in for the process being killed in the middle of a run."""


def die_after_shards(monkeypatch, count, error=Killed):
    """Make the next run raise `error` when it is about to write shard number `count` + 1."""
    real_write, written = shard_writer.SplitShardWriter._write_shard, []

    def dying_write(self, n):
        if len(written) == count:
            raise error
        real_write(self, n)
        written.append(self.shards[-1].file)

    monkeypatch.setattr(shard_writer.SplitShardWriter, "_write_shard", dying_write)
    return written
