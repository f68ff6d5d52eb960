r"""Train a sentencepiece tokenizer on a deterministic sample of documents.

    python -m data_prep.train_tokenizer --source web=corpus/*.jsonl --out tok/tokenizer.model \
        --vocab-size 32000 --num-docs 200000

Writes the .model and its card (`tokenizer.card.json`: vocab size, special ids, sha256, settings).
Defaults are chosen for lossless round trips of any UTF-8 text, code included: identity
normalization, whitespace kept as is, byte fallback for characters outside the vocabulary, and
"\n" as a piece of its own (sentencepiece trains on lines, so it never sees one otherwise).
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import datasets
import numpy as np
import sentencepiece as spm

from data_prep.atomic import write_bytes_atomic, write_json_atomic
from data_prep.cli import command_parser, interrupt_exits
from data_prep.output_dir import OutputDirError, check_writable_dir, removed_if_empty_on_failure
from data_prep.sources import (
    Source,
    SourceError,
    add_reading_args,
    load_source,
    report_skipped,
    sources_from_args,
)
from data_prep.tokenizer_card import Tokenizer, TokenizerError, card_path_for, load_tokenizer

MODEL_TYPES = ("bpe", "unigram")
MAX_LINE_CHARS = 4096  # sentencepiece drops longer sentences; split them instead


def sample_documents(corpus: datasets.Dataset, num_docs: int, seed: int) -> datasets.Dataset:
    """Uniform sample without replacement, kept in corpus order, a function of (corpus, seed) only."""
    if num_docs >= len(corpus):
        return corpus
    rng = np.random.default_rng(seed)
    return corpus.select(np.sort(rng.choice(len(corpus), size=num_docs, replace=False)))


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                for start in range(0, len(line), MAX_LINE_CHARS):
                    yield line[start : start + MAX_LINE_CHARS]


def _iter_text(corpus: datasets.Dataset, batch_size: int = 1000) -> Iterator[str]:
    for batch in corpus.iter(batch_size=batch_size):
        yield from batch["text"]  # strings by load_source's rule; empty ones yield no lines


def _train(
    lines: Iterator[str],
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    byte_fallback: bool,
    ids: tuple[int, int, int, int],
    max_sentences: int,
    num_threads: int | None,
) -> bytes:
    """The trained .model's bytes."""
    unk_id, bos_id, eos_id, pad_id = ids
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        unk_id=unk_id,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=4 * MAX_LINE_CHARS,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


def _check_settings(model_type: str, vocab_size: int, num_docs: int, seed: int, ids: tuple[int, int, int, int]) -> None:
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
    if vocab_size < 1 or num_docs < 1:
        raise TokenizerError(f"vocab_size and num_docs must be >= 1, got {vocab_size} and {num_docs}")
    if not 0 <= seed < 2**32:  # sentencepiece's generator seed is a uint32
        raise TokenizerError(f"seed must be in [0, 2**32), got {seed}")
    named = dict(zip(("unk_id", "bos_id", "eos_id", "pad_id"), ids))
    if named["unk_id"] < 0 or named["eos_id"] < 0:  # sentencepiece needs unk; shards need EOS between documents
        raise TokenizerError(f"unk_id and eos_id must be >= 0 (got {named['unk_id']} and {named['eos_id']})")
    for name, value in named.items():
        if value >= vocab_size:
            raise TokenizerError(f"{name} {value} is not below vocab_size {vocab_size}")
        same = [other for other, v in named.items() if v == value and other != name and value >= 0]
        if same:
            raise TokenizerError(f"{name} and {same[0]} are both {value}; special ids must differ (-1 disables one)")


def train_tokenizer(
    sources: Sequence[Source],
    out: str | Path,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    num_docs: int = 100_000,
    seed: int = 0,
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    max_sentences: int = 2_000_000,
    ids: tuple[int, int, int, int] = (0, 1, 2, 3),  # unk, bos, eos, pad
    num_threads: int | None = None,
    overwrite: bool = False,
    cache_dir: str | None = None,
) -> Tokenizer:
    """Train on a sample of `num_docs` documents of `sources`; write the model to `out` and its card next to it."""
    out = Path(out)
    card_path = card_path_for(out)
    _check_output(out, card_path, overwrite)
    _check_settings(model_type, vocab_size, num_docs, seed, ids)  # before the corpus is read
    sample = sample_documents(_read_sources(sources, cache_dir), num_docs, seed)
    lines = _lines_to_train_on(sample, sources)
    spm.set_random_generator_seed(seed)  # sentencepiece's own sentence shuffling
    try:
        model = _train(
            lines, vocab_size, model_type, character_coverage, byte_fallback, ids, max_sentences, num_threads
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high": the corpus is too small for it
        raise TokenizerError(f"sentencepiece training on {[s.spec for s in sources]} failed: {e}") from None
    _write_model(out, model, card_path)
    tok = load_tokenizer(out)
    write_json_atomic(
        card_path,
        tok.card(
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            normalization="identity",
            num_docs=len(sample),
            seed=seed,
            sources=[s.describe() for s in sources],
        ),
    )
    return tok


def _check_output(out: Path, card_path: Path, overwrite: bool) -> None:
    """Refusals about where the model goes: now, not after the training."""
    if out.is_dir():
        raise TokenizerError(f"{out}: is a directory; --out is the path of the .model file to write")
    check_writable_dir(out.parent)
    if not overwrite:
        for existing in (out, card_path):
            if existing.exists():
                raise TokenizerError(f"{existing}: already exists; pass --overwrite to replace it")


def _read_sources(sources: Sequence[Source], cache_dir: str | None) -> datasets.Dataset:
    corpus = datasets.concatenate_datasets([load_source(s, cache_dir) for s in sources])
    for source in sources:
        report_skipped(source, "the tokenizer card")
    return corpus


def _lines_to_train_on(sample: datasets.Dataset, sources: Sequence[Source]) -> Iterator[str]:
    """The sample's training lines; a sample without any is refused before sentencepiece starts."""
    lines = training_lines(_iter_text(sample))
    first = next(lines, None)
    if first is None:
        raise SourceError(f"sources {[s.spec for s in sources]}: no non-blank text to train a tokenizer on")
    return itertools.chain([first], lines)


def _write_model(out: Path, model: bytes, card_path: Path) -> None:
    with removed_if_empty_on_failure(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, model)
    card_path.unlink(missing_ok=True)  # the old card (if any) describes the old model


def main(argv: Sequence[str] | None = None) -> None:
    p = command_parser("train_tokenizer", __doc__)
    p.add_argument("--source", action="append", required=True, help="[NAME=]SPEC, repeatable (see data_prep.sources)")
    p.add_argument("--out", required=True, help="path of the .model file to write")
    add_reading_args(p, "card")
    p.add_argument("--vocab-size", type=int, default=8192, help="pieces in the vocabulary (default: %(default)s)")
    p.add_argument(
        "--model-type", default="bpe", choices=MODEL_TYPES, help="sentencepiece's model type (default: %(default)s)"
    )
    p.add_argument(
        "--num-docs", type=int, default=100_000, help="documents sampled for training (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="the seed of that sample (default: %(default)s)")
    p.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of the characters the vocabulary covers; the rarest others fall back (default: %(default)s)",
    )
    p.add_argument(
        "--no-byte-fallback", action="store_true", help="characters outside the vocabulary become <unk>, not bytes"
    )
    p.add_argument(
        "--max-sentences", type=int, default=2_000_000, help="lines sentencepiece keeps (default: %(default)s)"
    )
    for piece, default in (("unk", 0), ("bos", 1), ("eos", 2), ("pad", 3)):
        p.add_argument(
            f"--{piece}-id", type=int, default=default, help=f"the id of {piece.upper()} (default: %(default)s)"
        )
    p.add_argument("--cache-dir", default=None, help="datasets cache directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its card")
    a = p.parse_args(argv)
    with interrupt_exits("run the same command again"):
        try:
            sources = sources_from_args(a)
            tok = train_tokenizer(
                sources,
                a.out,
                a.vocab_size,
                a.model_type,
                a.num_docs,
                a.seed,
                a.character_coverage,
                not a.no_byte_fallback,
                a.max_sentences,
                (a.unk_id, a.bos_id, a.eos_id, a.pad_id),
                overwrite=a.overwrite,
                cache_dir=a.cache_dir,
            )
        except (SourceError, TokenizerError, OutputDirError, OSError) as e:  # OSError: names its file
            raise SystemExit(f"error: {e}") from None

    print(f"wrote {tok.path} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}...) and {card_path_for(tok.path)}")


if __name__ == "__main__":
    main()
