"""How a prompt starts: as the model's training documents started.

data_prep.tokenize frames documents as `doc EOS doc EOS ...`, or `BOS doc EOS BOS doc EOS ...` with
--bos, and the training loader starts a document at every token after an EOS. The trainer records
which (`documents_start_with_bos` in the checkpoint's client state and in a native export's
config.json); None where nothing says (older checkpoints, imported weights). A model trained without
BOS has never seen it: its embedding is the untrained initial one.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .errors import CheckpointError

FRAMING_KEY = "documents_start_with_bos"
PROMPT_PREFIXES = ("auto", "bos", "none")


def read_framing(value: Any, origin: str) -> Optional[bool]:
    """The recorded fact: True, False or None (not recorded)."""
    if value is None or isinstance(value, bool):
        return value
    raise CheckpointError(f"{origin}: {FRAMING_KEY} must be true, false or null, got {value!r}")


def chosen_framing(prompt_prefix: str, recorded: Optional[bool]) -> Optional[bool]:
    """--prompt-prefix: auto follows the recorded framing; bos / none say how the training documents started."""
    if prompt_prefix not in PROMPT_PREFIXES:
        raise ValueError(f"--prompt-prefix: {prompt_prefix!r} is not one of {list(PROMPT_PREFIXES)}")
    return {"auto": recorded, "bos": True, "none": False}[prompt_prefix]


def _bos(bos_id: int) -> int:
    if bos_id < 0:
        raise ValueError("prompts start with BOS as the training documents did, but the tokenizer has no BOS")
    return bos_id


def prompt_tokens(tokens: Sequence[int], starts_with_bos: Optional[bool], bos_id: int, eos_id: int) -> list[int]:
    """A prompt for generation: [BOS] + tokens where the training documents started with BOS; tokens
    alone where they did not (an empty prompt: [EOS], which every training document follows); not
    recorded (None): [BOS] + tokens when the tokenizer has a BOS, else tokens alone."""
    if starts_with_bos is None:
        return ([bos_id] if bos_id >= 0 else []) + list(tokens)
    if starts_with_bos:
        return [_bos(bos_id)] + list(tokens)
    return list(tokens) if len(tokens) or eos_id < 0 else [eos_id]


def context_prefix(starts_with_bos: Optional[bool], bos_id: int, eos_id: int) -> tuple[int, bool]:
    """(token put before every scored context, whether the token after it starts a document).
    BOS where the training documents started with it; EOS then a document start where they followed
    an EOS (the loader's doc_starts); not recorded (None): BOS if the tokenizer has one, else EOS."""
    if starts_with_bos is None:
        return (bos_id if bos_id >= 0 else eos_id), False
    if starts_with_bos:
        return _bos(bos_id), False
    if eos_id < 0:
        raise ValueError("the training documents follow an EOS, but the tokenizer has no EOS")
    return eos_id, True
