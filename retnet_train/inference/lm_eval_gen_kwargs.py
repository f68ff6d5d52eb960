"""The generation_kwargs of lm-eval's generate_until requests, read as the settings of our generate().

lm-eval's HF backend reads the tokens to generate from max_gen_toks or its aliases (lm_eval.models.utils.
normalize_gen_kwargs) and hands every other key to transformers' generate, which follows it. Our generate()
follows until, do_sample, temperature, top_k, top_p and seed; any other key is an error naming it, so that
no setting a task asks for is dropped without a word.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Tuple

from .errors import SettingError
from .sampling import SamplingParams

# lm-eval's names of the tokens to generate, in its order where several are given
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
SEARCH_KEYS = ("until", "do_sample", "temperature", "top_k", "top_p", "seed")
BEAMS = "num_beams"  # our search is one beam: num_beams 1 asks for what we do


def read_generation_kwargs(
    gen_kwargs: Optional[dict], default_max_gen_toks: int, max_length: int, vocab_size: int
) -> Tuple[SamplingParams, List[str]]:
    """(sampling settings, stop strings) of one request's generation_kwargs; a bad or unknown key is a
    ValueError naming it ('generate_until: generation_kwargs top_p: must be in (0, 1], got 0').
    max_length: the window that holds the prompt and the tokens generated."""
    kw = dict(gen_kwargs or {})
    _refuse_what_we_cannot_follow(kw)
    max_key = _max_tokens_key(kw)
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    do_sample = bool(kw.get("do_sample", False))
    temperature = _number(kw, "temperature", 1.0 if do_sample else 0.0)
    params = SamplingParams(
        max_new_tokens=_integer(kw, max_key, default_max_gen_toks) if max_key else default_max_gen_toks,
        temperature=temperature if do_sample else 0.0,
        top_k=_integer(kw, "top_k", 0),
        top_p=_number(kw, "top_p", 1.0),  # 0 is refused, as generate's --top-p 0: not off
        seed=_integer(kw, "seed", None),
    )
    try:  # as the generate command checks its flags, also those greedy decoding does not use
        params.validate(vocab_size)
    except SettingError as e:
        key = (max_key or "max_gen_toks") if e.name == "max_new_tokens" else e.name
        raise ValueError(f"generate_until: generation_kwargs {key}: {e.problem}") from None
    _refuse_no_room_for_the_prompt(params.max_new_tokens, max_key, max_length)
    return params, until


def _refuse_no_room_for_the_prompt(max_new_tokens: int, max_key: Optional[str], max_length: int) -> None:
    """The prompt keeps max_length - max_new_tokens tokens: none left is refused, as lm-eval's HF backend
    does, rather than a prompt cut to its first token."""
    if max_new_tokens < max_length:
        return
    given = f"generation_kwargs {max_key}" if max_key else "max_gen_toks"
    source = "" if max_key else " (--model_args)"
    raise ValueError(
        f"generate_until: {given}={max_new_tokens}{source}: must be less than max_length={max_length} "
        "(--max-length), the window that holds the prompt and the tokens generated"
    )


def _refuse_what_we_cannot_follow(kw: dict) -> None:
    for key, value in kw.items():
        if key in SEARCH_KEYS or key in MAX_TOKEN_KEYS:
            continue
        if key == BEAMS:
            if value not in (None, 1):
                raise ValueError(f"generate_until: generation_kwargs {key}: only 1 is supported, got {value!r}")
        elif key == "max_length":  # transformers' sense hangs on the batch's padded prompt length
            raise ValueError(
                f"generate_until: generation_kwargs {key}: not supported (prompt + generated tokens, "
                "in transformers); use max_gen_toks"
            )
        else:
            raise ValueError(
                f"generate_until: generation_kwargs {key}: not supported (retnet-train follows "
                f"{', '.join(SEARCH_KEYS)}, {BEAMS}=1 and the tokens to generate: {', '.join(MAX_TOKEN_KEYS)})"
            )


def _max_tokens_key(kw: dict) -> Optional[str]:
    """The key that gives the tokens to generate (None: none does); lm-eval's order where several do."""
    given = [key for key in MAX_TOKEN_KEYS if kw.get(key) is not None]
    if len({str(kw[key]) for key in given}) > 1:
        chosen = ", ".join(f"{key}={kw[key]!r}" for key in given)
        print(f"generate_until: generation_kwargs {chosen}: using {given[0]} (lm-eval's order)", file=sys.stderr)
    return given[0] if given else None


def _number(kw: dict, key: str, default: float) -> float:
    """kw[key] as a float (a number, or a string of one); not set or None: the default."""
    value = kw.get(key)
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"generate_until: generation_kwargs {key}: must be a number, got {value!r}") from None


def _integer(kw: dict, key: str, default: Optional[int]) -> Optional[int]:
    """kw[key] as an int (an int, a string of one, or a float that holds one); not set or None: the default.
    int() alone would cut 2.5 to 2."""
    value = kw.get(key)
    if value is None:
        return default
    try:
        return int(value) if isinstance(value, (int, str)) else _whole(float(value))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"generate_until: generation_kwargs {key}: must be an integer, got {value!r}") from None


def _whole(number: float) -> int:
    if not number.is_integer():
        raise ValueError(number)
    return int(number)
