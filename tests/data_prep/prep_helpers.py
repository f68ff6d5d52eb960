"""Shared inputs for data_prep tests: a small real corpus and a tokenizer trained on it."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np

from data_prep.sources import Source, parse_source
from data_prep.train_tokenizer import train_tokenizer

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
