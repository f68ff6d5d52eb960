"""The tokenizer card: a small JSON file next to the .model that says what the model is.

Shard manifests and the trainer identify a tokenizer by the sha256 of its .model file, so the card
records that hash; loading through `load_tokenizer` re-hashes the file and refuses a card that
describes some other model file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from retnet_train.data.manifest import sha256_file

CARD_SUFFIX = ".card.json"


class TokenizerError(ValueError):
    """A tokenizer model/card is missing, corrupt or inconsistent."""


def card_path_for(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + CARD_SUFFIX)


@dataclass(frozen=True)
class Tokenizer:
    """A loaded sentencepiece model plus the identity facts everything downstream checks."""

    path: Path
    sha256: str
    processor: spm.SentencePieceProcessor

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    def card(self, **extra) -> dict:
        return {
            "model_file": self.path.name,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            **extra,
        }


def load_tokenizer(model_path: str | Path) -> Tokenizer:
    """Load a .model; if a card exists next to it, it must describe this exact file."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise TokenizerError(f"{model_path}: tokenizer model not found")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(model_path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{model_path}: not a sentencepiece model ({e})") from None
    tok = Tokenizer(model_path, sha256_file(model_path), processor)
    if tok.eos_id < 0:
        raise TokenizerError(f"{model_path}: model has no EOS id; documents could not be separated in shards")
    card_path = card_path_for(model_path)
    if card_path.is_file():
        card = read_card(card_path)
        for key, actual in (("sha256", tok.sha256), ("vocab_size", tok.vocab_size), ("eos_id", tok.eos_id)):
            if card.get(key) != actual:
                raise TokenizerError(f"{card_path}: {key} is {card.get(key)!r} but {model_path} has {actual!r}")
    return tok


def read_card(card_path: str | Path) -> dict:
    card_path = Path(card_path)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{card_path}: unreadable tokenizer card ({e})") from None
    if not isinstance(card, dict):
        raise TokenizerError(f"{card_path}: tokenizer card is not a JSON object")
    return card
