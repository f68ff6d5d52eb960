"""Tokenize corpora into checksummed, resumable token shards (one directory per named source).

    python -m data_prep.tokenize --tokenizer tok/tokenizer.model --out data/shards \
        --source web=corpus/web/*.jsonl --source code=hf:bigcode/the-stack-smol@train --num-proc 8

Per source: `<out>/<name>/{train,validation}_NNNNN.bin` (flat little-endian uint16/uint32 tokens,
every document followed by EOS) and `manifest.json` (see retnet_train.data.manifest), written
last. Documents go to the validation split by a hash of (seed, document index). Killed runs are
resumed by running the same command again; an existing finished output is never replaced
without --overwrite.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_prep.atomic import remove_stale_tmp_files, write_json_atomic
from data_prep.doc_split import validation_mask
from data_prep.shard_writer import Journal, SplitShardWriter, verified_prefix
from data_prep.sources import Source, SourceError, load_source, parse_source
from data_prep.tokenizer_card import Tokenizer, TokenizerError, load_tokenizer
from retnet_train.data.manifest import (
    DTYPES, FORMAT_VERSION, MANIFEST_NAME, SPLITS, Manifest, token_dtype_for,
)

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16: few files, still cheap to re-verify one


class _Encoder:
    """Picklable batch encoder for datasets.map: each worker process loads the model once."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._sp = None

    def __getstate__(self):
        return {"model_path": self.model_path, "_sp": None}

    def __call__(self, batch: dict) -> dict:
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        # one C++ call per batch; int32 arrays convert to Arrow without a per-token Python loop
        return {"ids": [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(batch["text"])]}


def frame_documents(flat: np.ndarray, lengths: np.ndarray, eos_id: int, bos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents as [BOS] tokens EOS, vectorized. Returns (tokens, framed lengths)."""
    extra = 1 + (bos_id is not None)
    out_lengths = lengths + extra
    out = np.empty(int(out_lengths.sum()), dtype=flat.dtype)
    ends = np.cumsum(out_lengths)
    special = np.zeros(out.size, dtype=bool)
    special[ends - 1] = True
    out[ends - 1] = eos_id
    if bos_id is not None:
        special[ends - out_lengths] = True
        out[ends - out_lengths] = bos_id
    out[~special] = flat
    return out, out_lengths


def _flatten_ids(table_column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    chunks = table_column.chunks
    if not chunks:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    # int32 as encoded (ids < 2**31): half the memory of int64 for a chunk of documents
    flat = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in chunks]).astype(np.int32, copy=False)
    lengths = np.concatenate([c.value_lengths().to_numpy(zero_copy_only=False) for c in chunks]).astype(np.int64)
    return flat, lengths


def _clear_output(out_dir: Path) -> None:
    """--overwrite: remove exactly the files this tool writes, nothing else in the directory."""
    for split in SPLITS:
        for f in out_dir.glob(f"{split}_*.bin"):
            f.unlink()
    for name in (MANIFEST_NAME, "progress.jsonl"):
        (out_dir / name).unlink(missing_ok=True)
    remove_stale_tmp_files(out_dir)


def tokenize_source(
    source: Source,
    tokenizer: Tokenizer | str | Path,
    out_dir: str | Path,
    validation_fraction: float = 0.005,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    add_bos: bool = False,
    num_proc: int | None = None,
    chunk_docs: int = 20_000,
    batch_size: int = 256,
    overwrite: bool = False,
    cache_dir: str | None = None,
    progress: bool = True,
) -> Manifest:
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    dtype = token_dtype_for(tok.vocab_size)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if (out_dir / MANIFEST_NAME).exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir / MANIFEST_NAME}: output already exists; pass --overwrite to rebuild it")
        _clear_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp_files(out_dir)

    corpus = load_source(source, cache_dir)
    nulls = corpus.data.column("text").null_count
    if nulls:
        raise SourceError(f"source {source.name!r} ({source.spec}): {nulls} documents have no text (null {source.text_field!r})")
    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tok.sha256,
        "source": source.describe(),
        # an input edited in place must not be resumed into shards made from its old content
        "mtimes": [p.stat().st_mtime_ns for p in source.files],
        "documents": len(corpus),
        "validation_fraction": validation_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "add_bos": add_bos,
        "dtype": dtype,
    }
    journal = Journal(out_dir, hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest())
    if overwrite:
        journal.path.unlink(missing_ok=True)
    records = journal.read()
    itemsize = DTYPES[dtype].itemsize
    kept = {split: verified_prefix(out_dir, split, records, itemsize) for split in SPLITS}
    kept_files = {r["file"] for rs in kept.values() for r in rs}
    for split in SPLITS:  # unjournaled or damaged shards: regenerated below
        for f in out_dir.glob(f"{split}_*.bin"):
            if f.name not in kept_files:
                f.unlink()
    journal.start([r for split in SPLITS for r in kept[split]])
    writers = {
        split: SplitShardWriter(out_dir, split, DTYPES[dtype], shard_tokens, tok.eos_id, journal, kept[split])
        for split in SPLITS
    }
    start_doc = min(w.resume.doc for w in writers.values())
    if start_doc:
        print(f"{out_dir}: resuming at document {start_doc} of {len(corpus)} "
              f"(kept {sum(len(v) for v in kept.values())} verified shards)")

    encoder = _Encoder(str(tok.path))
    bos_id = tok.bos_id if add_bos else None
    num_proc = num_proc or os.cpu_count() or 1
    bar = tqdm(desc=f"tokenize {source.name}", unit="tok", unit_scale=True, disable=not progress)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our bar counts tokens; datasets' would count rows per chunk
    try:
        for lo in range(start_doc, len(corpus), chunk_docs):
            hi = min(lo + chunk_docs, len(corpus))
            doc_ids = np.arange(lo, hi)
            in_val = validation_mask(doc_ids, validation_fraction, seed)
            # after a resume, skip documents whose split already has them on disk
            needed = np.where(in_val, doc_ids >= writers["validation"].resume.doc, doc_ids >= writers["train"].resume.doc)
            doc_ids, in_val = doc_ids[needed], in_val[needed]
            if not doc_ids.size:
                continue
            encoded = corpus.select(doc_ids).map(
                encoder, batched=True, batch_size=batch_size,
                num_proc=workers if (workers := min(num_proc, doc_ids.size)) > 1 else None,  # None: in-process
                remove_columns=["text"], keep_in_memory=True, desc=None,
            )
            flat, lengths = _flatten_ids(encoded.data.column("ids"))
            nonempty = lengths > 0  # an empty text is not a document: no lone EOS
            for split, member in (("train", ~in_val & nonempty), ("validation", in_val & nonempty)):
                tokens, framed = frame_documents(flat[np.repeat(member, lengths)], lengths[member], tok.eos_id, bos_id)
                writers[split].add(tokens, doc_ids[member], framed)
            bar.update(int(flat.size))
            bar.set_postfix(docs=f"{hi}/{len(corpus)}")
    finally:
        bar.close()
        if was_enabled:
            datasets.enable_progress_bars()

    splits = {split: w.finish() for split, w in writers.items()}
    if splits["train"].tokens == 0:
        raise SourceError(f"source {source.name!r} ({source.spec}): empty corpus (no text in any document)")
    if validation_fraction > 0 and splits["validation"].documents == 0:
        print(f"warning: {source.name}: validation fraction {validation_fraction} selected no documents")
    manifest = Manifest(
        directory=out_dir,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        bos_id=tok.bos_id,
        pad_id=tok.pad_id,
        unk_id=tok.unk_id,
        tokenizer_sha256=tok.sha256,
        dtype=dtype,
        shard_tokens=shard_tokens,
        splits=splits,
        extra={
            "add_bos": add_bos,
            "split_rule": {"validation_fraction": validation_fraction, "seed": seed, "unit": "document"},
            "source": source.describe(),
            "created_unix": int(time.time()),
        },
    )
    write_json_atomic(manifest.path, manifest.to_json())  # last: its presence means "complete"
    journal.path.unlink()
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", required=True, help="NAME=SPEC, repeatable (see data_prep.sources)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    p.add_argument("--out", required=True, help="output root; each source goes to OUT/NAME")
    p.add_argument("--text-field", default="text")
    p.add_argument("--text-unit", default="document", choices=("document", "line", "paragraph"))
    p.add_argument("--validation-fraction", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--bos", action="store_true", help="also put BOS before every document")
    p.add_argument("--num-proc", type=int, default=os.cpu_count())
    p.add_argument("--chunk-docs", type=int, default=20_000,
                   help="documents per map call: resume granularity and peak memory (lower it for very long documents)")
    p.add_argument("--cache-dir", default=None, help="datasets cache directory")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        tok = load_tokenizer(a.tokenizer)
        sources = [parse_source(s, a.text_field, a.text_unit) for s in a.source]
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise SourceError(f"source names must be unique, got {names}")
        for source in sources:
            m = tokenize_source(
                source, tok, Path(a.out) / source.name, a.validation_fraction, a.seed, a.shard_tokens, a.bos,
                a.num_proc, a.chunk_docs, overwrite=a.overwrite, cache_dir=a.cache_dir,
            )
            counts = ", ".join(f"{k} {v.tokens:,} tokens / {v.documents:,} docs" for k, v in m.splits.items())
            print(f"{m.path}: {counts}")
    except (SourceError, TokenizerError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
