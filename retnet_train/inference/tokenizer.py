"""Which sentencepiece tokenizer a model is used with, and the checks that it is the one it was trained with."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .errors import CheckpointError


@dataclass(frozen=True)
class TrainedTokenizer:
    """The tokenizer a checkpoint or export names: `named`, the path it gives (None: none), and, where
    the trainer recorded them (not in checkpoints of older trainers, nor in exports), its sha256 and its
    absolute path at launch."""

    named: Optional[str]
    sha256: Optional[str] = None
    recorded_path: Optional[str] = None

    def found(self) -> Optional[str]:
        """The named path where it is a file, else the recorded absolute one where that is (a relative path
        read from another directory than the launch dir), else the named one (whose absence is an error)."""
        if self.named is not None and os.path.isfile(self.named):
            return self.named
        if self.recorded_path is not None and os.path.isfile(self.recorded_path):
            return self.recorded_path
        return self.named or self.recorded_path


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


def sha256_of(path: str) -> str:
    from ..data import sha256_file

    return sha256_file(path)


def same_file(a: str, b: str) -> bool:
    return sha256_of(a) == sha256_of(b)


def choose_tokenizer(given: Optional[str], trained: TrainedTokenizer, origin: str, vocab_size: int) -> Optional[str]:
    """The tokenizer to use: the one given, else the one `origin` (a checkpoint or export) names. It must
    be the one trained with: the recorded sha256 decides where there is one; else a given one must equal
    the named file where that is found. A tokenizer of the same size with other pieces would give other
    text and perplexities without a word."""
    tok = given or trained.found()
    if tok is None:
        return None
    which = "--tokenizer" if given else f"the tokenizer named by {origin}"
    _check_is_file(tok, which, None if given else trained)
    check_tokenizer(tok, vocab_size)
    if trained.sha256 is not None:
        _check_recorded_sha(tok, which, trained, origin)
    elif given and trained.named and os.path.isfile(trained.named) and not same_file(given, trained.named):
        raise CheckpointError(
            f"--tokenizer: {given} differs from the tokenizer the model was trained with "
            f"({trained.named}); token ids would not mean the same pieces"
        )
    return tok


def _check_is_file(tok: str, which: str, stored: Optional[TrainedTokenizer]) -> None:
    """tok must be a file; for a stored path (`stored`), the error says where it was looked for and how to go on."""
    if os.path.isfile(tok):
        return
    problem = "is a directory, not a sentencepiece model" if os.path.isdir(tok) else "does not exist"
    if stored is not None:
        looked = [] if os.path.isabs(tok) else ["relative to the directory training was launched from"]
        if stored.recorded_path not in (None, tok):
            looked.append(f"nor at {stored.recorded_path}, its path at launch")
        problem += f" ({', '.join(looked)}{': ' if looked else ''}run from there or pass --tokenizer)"
    raise CheckpointError(f"{which}: {tok} {problem}")


def _check_recorded_sha(tok: str, which: str, trained: TrainedTokenizer, origin: str) -> None:
    found = sha256_of(tok)
    if found == trained.sha256:
        return
    remedy = "" if which == "--tokenizer" else "; pass the tokenizer it was trained with as --tokenizer"
    raise CheckpointError(
        f"{which}: {tok} (sha256 {found[:12]}...) differs from the tokenizer the model was trained with "
        f"({trained.recorded_path}, sha256 {trained.sha256[:12]}..., as {origin} records); token ids would "
        f"not mean the same pieces{remedy}"
    )
