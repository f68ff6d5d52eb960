"""Checks that a sentencepiece tokenizer fits a model."""

from __future__ import annotations

from .errors import CheckpointError


def check_tokenizer(path: str, vocab_size: int) -> None:
    """A sentencepiece model whose vocabulary matches the model's embedding rows."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"tokenizer {path}: not a sentencepiece model ({e})") from None
    if sp.get_piece_size() != vocab_size:
        raise CheckpointError(
            f"tokenizer {path}: vocabulary of {sp.get_piece_size()} pieces, model has vocab_size={vocab_size}"
        )


def same_file(a: str, b: str) -> bool:
    from ..data import sha256_file

    return sha256_file(a) == sha256_file(b)
