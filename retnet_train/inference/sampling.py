"""Next-token choice from logits: greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import SettingError

SEED_RANGE = 2**64  # torch.Generator.manual_seed's seeds


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy; a tiny one acts as greedy too (its limit)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: Optional[int] = None

    def validate(self, vocab_size: Optional[int] = None) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SettingError("max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not t >= 0 or t == float("inf"):
            raise SettingError("temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SettingError("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if vocab_size is not None and self.top_k > vocab_size:
            raise SettingError("top_k", f"{self.top_k} exceeds the vocabulary ({vocab_size})")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise SettingError("top_p", f"must be in (0, 1], got {self.top_p!r}")


def sample(logits: torch.Tensor, params: SamplingParams, generator=None) -> torch.Tensor:
    """Next token per row of logits [B, V] -> [B]. generator: one torch.Generator for all rows, or a
    list of one per row (each row's draws then depend on its own stream alone)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    # shifted so that the row's best is 0: a tiny temperature sends the others to -inf, whose limit
    # is greedy, instead of the best to inf (inf - inf = nan); below fp32's smallest normal the
    # scaled logits are those at it
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(params.temperature, torch.finfo(torch.float32).tiny)
    if params.top_k:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g)[:, 0] for i, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def prompt_generators(seed: int, first: int, count: int, device: torch.device) -> list:
    """One generator per prompt, seeded from (seed, prompt index): what a prompt samples does not depend on
    which prompts share its batch. Any integer seed: torch takes seeds of 64 bits and a negative one as its
    two's complement, so the seed modulo 2^64 is the same seed where torch takes it, and a valid one where not."""
    return [
        torch.Generator(device=device).manual_seed((seed * 1_000_003 + i) % SEED_RANGE)
        for i in range(first, first + count)
    ]
