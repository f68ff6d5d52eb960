r"""Tokenize corpora into checksummed, resumable token shards (one directory per named source).

    python -m data_prep.tokenize --tokenizer tok/tokenizer.model --out data/shards \
        --source web=corpus/web/*.jsonl --source code=hf:bigcode/the-stack-smol@train --num-proc 8

Per source: `<out>/<name>/{train,validation}_NNNNN.bin` (flat little-endian uint16/uint32 tokens,
every document followed by EOS) and `manifest.json` (see retnet_train.data.manifest), written
last. Documents go to the validation split by a hash of (seed, document index). Killed runs are
resumed by running the same command again (see data_prep.resume); an existing finished output is
never replaced without --overwrite, and only files this tool recorded are ever deleted (see
data_prep.output_dir).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from data_prep.atomic import write_json_atomic
from data_prep.cli import command_parser, interrupt_exits
from data_prep.doc_split import validation_mask
from data_prep.output_dir import (
    OutputDirError,
    check_shard_dir,
    exclusive,
    prepare_shard_dir,
    removed_if_empty_on_failure,
)
from data_prep.resume import Layout, finished_output, output_manifest, resumed_writers, settings_fingerprint
from data_prep.shard_writer import Journal, SplitShardWriter
from data_prep.sources import (
    Source,
    SourceError,
    add_reading_args,
    load_source,
    report_skipped,
    sources_from_args,
)
from data_prep.tokenizer_card import Tokenizer, TokenizerError, load_tokenizer
from data_prep.workers import die_with_parent, interrupts_deferred
from retnet_train.data.manifest import DTYPES, Manifest, token_dtype_for

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16: few files, still cheap to re-verify one
INTERRUPT_NOTICE = "interrupt: stopping when the workers finish this chunk of documents (Ctrl-C again: now)"


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


def frame_documents(
    flat: np.ndarray, lengths: np.ndarray, eos_id: int, bos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
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


class SettingError(ValueError):
    """A tokenize_source setting out of its range; `name` is the parameter, `requirement` what it needs."""

    def __init__(self, name: str, requirement: str):
        super().__init__(f"{name} {requirement}")
        self.name, self.requirement = name, requirement


# The command-line flag of each setting _check_settings checks (batch_size has none: main passes 1)
FLAGS = {
    "shard_tokens": "--shard-tokens",
    "chunk_docs": "--chunk-docs",
    "num_proc": "--num-proc",
    "validation_fraction": "--validation-fraction",
    "seed": "--seed",
}


def _check_settings(
    shard_tokens: int, validation_fraction: float, seed: int, chunk_docs: int, batch_size: int, num_proc: int | None
) -> None:
    for name, value in (("shard_tokens", shard_tokens), ("chunk_docs", chunk_docs), ("batch_size", batch_size)):
        if value < 1:
            raise SettingError(name, f"must be >= 1, got {value}")
    if num_proc is not None and num_proc < 1:  # None: one worker per CPU
        raise SettingError("num_proc", f"must be >= 1, got {num_proc}")
    if not 0.0 <= validation_fraction < 1.0:
        raise SettingError("validation_fraction", f"must be in [0, 1), got {validation_fraction}")
    if not 0 <= seed < 2**64:  # the split hash keys on it as a uint64
        raise SettingError("seed", f"must be in [0, 2**64), got {seed}")


def _split_documents(
    corpus: datasets.Dataset, validation_fraction: float, seed: int, block: int = 1 << 22
) -> dict[str, int]:
    """Documents (non-empty texts) per split, counted before any work so that an empty split is
    known at once."""
    counts = {"train": 0, "validation": 0}
    column = corpus.data.column("text")
    for lo in range(0, len(corpus), block):
        nonempty = pc.greater(pc.utf8_length(column.slice(lo, block)), 0).to_numpy(zero_copy_only=False)
        in_val = validation_mask(np.arange(lo, lo + nonempty.size), validation_fraction, seed)
        counts["validation"] += int(np.count_nonzero(nonempty & in_val))
        counts["train"] += int(np.count_nonzero(nonempty & ~in_val))
    return counts


@dataclass(frozen=True)
class _Work:
    """The settings that decide only how the work is cut up and shown, never its output."""

    num_proc: int | None
    chunk_docs: int
    batch_size: int
    progress: bool


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
    """Tokenize one source into shards and a manifest in `out_dir`, resuming an unfinished run of the
    same inputs and settings."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    layout = Layout(validation_fraction, seed, shard_tokens, add_bos, token_dtype_for(tok.vocab_size))
    _check_settings(shard_tokens, validation_fraction, seed, chunk_docs, batch_size, num_proc)
    _check_bos(tok, add_bos)
    if not overwrite and (finished := finished_output(source, tok, out_dir, layout, cache_dir)) is not None:
        return finished
    check_shard_dir(out_dir, overwrite)  # refusals first: they cost nothing
    corpus = load_source(source, cache_dir)
    report_skipped(source, "the manifest")
    _check_split_sizes(source, corpus, validation_fraction, seed)
    with removed_if_empty_on_failure(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        with exclusive(out_dir):
            prepare_shard_dir(out_dir, overwrite)
            work = _Work(num_proc, chunk_docs, batch_size, progress)
            return _write_output(source, corpus, tok, out_dir, layout, work)


def _check_bos(tok: Tokenizer, add_bos: bool) -> None:
    if add_bos and tok.bos_id < 0:
        raise TokenizerError(f"{tok.path}: the model has no BOS id (trained with --bos-id -1); --bos needs one")


def _check_split_sizes(source: Source, corpus: datasets.Dataset, validation_fraction: float, seed: int) -> None:
    """Refuse an empty train split and warn of an empty validation split, before any tokenizing."""
    documents = _split_documents(corpus, validation_fraction, seed)
    if documents["train"] == 0:
        raise SourceError(
            f"source {source.name!r} ({source.spec}): all {documents['validation']} documents go to "
            f"the validation split (fraction {validation_fraction}); lower --validation-fraction"
        )
    if validation_fraction > 0 and documents["validation"] == 0:
        print(f"warning: {source.name}: validation fraction {validation_fraction} selected no documents")


def _write_output(
    source: Source, corpus: datasets.Dataset, tok: Tokenizer, out_dir: Path, layout: Layout, work: _Work
) -> Manifest:
    """Shards first, then the manifest, and the journal last: a run killed at any point can be resumed."""
    fingerprint = settings_fingerprint(source, corpus, tok, layout)
    journal = Journal(out_dir, fingerprint)
    writers = resumed_writers(journal, corpus, DTYPES[layout.dtype], layout.shard_tokens, tok.eos_id)
    try:
        _write_shards(corpus, writers, tok, layout, work, f"tokenize {source.name}")
    except BaseException:
        if not any(w.shards for w in writers.values()):
            journal.path.unlink(missing_ok=True)  # nothing to resume: leave no trace
        raise
    splits = {split: w.finish() for split, w in writers.items()}
    manifest = output_manifest(source, tok, out_dir, layout, splits, fingerprint)
    write_json_atomic(manifest.path, manifest.to_json())  # last: its presence means "complete"
    journal.path.unlink()
    return manifest


def _write_shards(
    corpus: datasets.Dataset,
    writers: dict[str, SplitShardWriter],
    tok: Tokenizer,
    layout: Layout,
    work: _Work,
    desc: str,
) -> None:
    encoder = _Encoder(str(tok.path))
    bos_id = tok.bos_id if layout.add_bos else None
    num_proc = work.num_proc or os.cpu_count() or 1
    start_doc = min(w.resume.doc for w in writers.values())
    bar = tqdm(desc=desc, unit="tok", unit_scale=True, disable=not work.progress)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our bar counts tokens; datasets' would count rows per chunk
    try:
        for lo in range(start_doc, len(corpus), work.chunk_docs):
            hi = min(lo + work.chunk_docs, len(corpus))
            doc_ids, in_val = _documents_to_write(lo, hi, writers, layout)
            if not doc_ids.size:
                continue
            flat, lengths = _encode(corpus, doc_ids, encoder, work.batch_size, num_proc)
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


def _documents_to_write(
    lo: int, hi: int, writers: dict[str, SplitShardWriter], layout: Layout
) -> tuple[np.ndarray, np.ndarray]:
    """Ids of documents lo..hi that are not on disk yet, and which of them go to validation."""
    doc_ids = np.arange(lo, hi)
    in_val = validation_mask(doc_ids, layout.validation_fraction, layout.seed)
    # after a resume, skip documents whose split already has them on disk
    needed = np.where(in_val, doc_ids >= writers["validation"].resume.doc, doc_ids >= writers["train"].resume.doc)
    return doc_ids[needed], in_val[needed]


def _encode(
    corpus: datasets.Dataset, doc_ids: np.ndarray, encoder: _Encoder, batch_size: int, num_proc: int
) -> tuple[np.ndarray, np.ndarray]:
    """The documents' token ids, concatenated, and each one's length."""
    workers = min(num_proc, doc_ids.size)
    # a Ctrl-C amid map's process pool leaves it hung or its workers running: it waits for the chunk
    waits = interrupts_deferred(INTERRUPT_NOTICE) if workers > 1 else contextlib.nullcontext()
    with die_with_parent(), waits:  # a killed tokenize must not leave map's worker processes behind
        encoded = corpus.select(doc_ids).map(
            encoder,
            batched=True,
            batch_size=batch_size,
            num_proc=workers if workers > 1 else None,  # None: in-process
            remove_columns=["text"],
            keep_in_memory=True,
            desc=None,
        )
    return _flatten_ids(encoded.data.column("ids"))


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("tokenize", __doc__)
    p.add_argument("--source", action="append", required=True, help="NAME=SPEC, repeatable (see data_prep.sources)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    p.add_argument("--out", required=True, help="output root; each source goes to OUT/NAME")
    add_reading_args(p, "manifest")
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=0.005,
        help="share of the documents in the validation split, picked by a hash of (seed, index) (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="the seed of that hash (default: %(default)s)")
    p.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file (default: %(default)s)"
    )
    p.add_argument("--bos", action="store_true", help="also put BOS before every document")
    p.add_argument(
        "--num-proc", type=int, default=os.cpu_count(), help="worker processes (default: one per CPU, %(default)s here)"
    )
    p.add_argument(
        "--chunk-docs",
        type=int,
        default=20_000,
        help="documents per map call: resume granularity and peak memory (lower it for very long documents; "
        "default: %(default)s)",
    )
    p.add_argument("--cache-dir", default=None, help="datasets cache directory")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a source's earlier output (only the files it recorded)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    try:
        _check_settings(a.shard_tokens, a.validation_fraction, a.seed, a.chunk_docs, 1, a.num_proc)
    except SettingError as e:
        raise SystemExit(f"error: {FLAGS[e.name]} {e.requirement}") from None
    with interrupt_exits("run the same command again to resume"):
        try:
            _tokenize_sources(a)
        except (SourceError, TokenizerError, OutputDirError, ValueError, OSError) as e:  # OSError: names its file
            raise SystemExit(f"error: {e}") from None


def _tokenize_sources(a: argparse.Namespace) -> None:
    """Every source of the command line into its shard directory (a finished one is kept as it is)."""
    tok = load_tokenizer(a.tokenizer)
    sources = sources_from_args(a)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise SourceError(f"source names must be unique, got {names}")
    layout = Layout(a.validation_fraction, a.seed, a.shard_tokens, a.bos, token_dtype_for(tok.vocab_size))
    finished = {}
    for source in sources:  # every output checked before hours go into the first one
        out = Path(a.out) / source.name
        if not a.overwrite and (m := finished_output(source, tok, out, layout, a.cache_dir)) is not None:
            finished[source.name] = m  # this same command finished it before being stopped
        else:
            check_shard_dir(out, a.overwrite)
    for source in sources:
        m = finished.get(source.name) or tokenize_source(
            source,
            tok,
            Path(a.out) / source.name,
            a.validation_fraction,
            a.seed,
            a.shard_tokens,
            a.bos,
            a.num_proc,
            a.chunk_docs,
            overwrite=a.overwrite,
            cache_dir=a.cache_dir,
        )
        counts = ", ".join(f"{k} {v.tokens:,} tokens / {v.documents:,} docs" for k, v in m.splits.items())
        print(f"{m.path}: {counts}")


if __name__ == "__main__":
    main()
