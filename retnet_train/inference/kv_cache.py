"""KV-cache decoding for the Transformer baseline (TransformerForCausalLM), outside the model
file: runs the model's own blocks with a preallocated cache [B, H, max_length, D] per layer.

The step attends over the whole cache with a mask (constant shapes, position in a device
tensor), so it is capturable in a CUDA graph like RetNet's step. Left padding: pads are masked
out as keys; a pad query attends to itself only (no empty softmax rows).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..model import TransformerForCausalLM
from ..model.layers import rotary_at, rotary_sin_cos
from .incremental import IncrementalDecoder


class KVCacheDecoder(IncrementalDecoder):
    def __init__(self, model: TransformerForCausalLM, batch_size: int, max_length: int):
        if not isinstance(model, TransformerForCausalLM):
            raise TypeError(f"KVCacheDecoder needs a TransformerForCausalLM, got {type(model).__name__}")
        super().__init__(model, batch_size)
        cfg, self.max_length = self.cfg, max_length
        # slots rounded up to 16: SDPA's memory-efficient kernel wants an aligned mask (the spare
        # slots are always masked, as are all slots past the position)
        slots = -(-max_length // 16) * 16
        shape = (batch_size, cfg.n_heads, slots, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layers)]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layers)]
        self.key_valid = torch.ones(batch_size, slots, dtype=torch.bool, device=self.device)
        self.position = torch.zeros((), dtype=torch.long, device=self.device)
        self.slots = torch.arange(slots, device=self.device)

    def buffers(self) -> List[torch.Tensor]:
        return [*self.k_cache, *self.v_cache, self.key_valid, self.position]

    def snapshot(self) -> List[torch.Tensor]:
        # The position and the valid keys, not the cache: a step writes slot `position` before reading
        # slots <= position, so slots written by a discarded step are overwritten before use (cloning
        # the cache would double its memory: 34 GB at 6.7B, 8k, batch 8).
        return [self.position.clone(), self.key_valid.clone()]

    def restore(self, snap: List[torch.Tensor]) -> None:
        self.position.copy_(snap[0])
        self.key_valid.copy_(snap[1])

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_cache, *self.v_cache))

    def _prefill_hidden(self, input_ids, doc_starts, chunk_size, piece) -> torch.Tensor:
        """Fills cache slots 0..T-1. chunk_size/piece: accepted for RetNet parity."""
        model = self.model
        T = input_ids.shape[1]
        if T >= self.max_length:
            raise ValueError(
                f"prefill: prompt of {T} tokens does not fit max_length={self.max_length} (needs room "
                "for one new token)"
            )
        mask = None  # no padding: causal attention among the prompt's own tokens (flash attention)
        self.key_valid.fill_(True)
        if doc_starts is not None and bool(doc_starts[:, 1:].any()):
            # the slots of each row's last document (pads lie before the first): all that the prompt's
            # last token and the new tokens see (earlier documents' own outputs are never read)
            starts = doc_starts.long()
            self.key_valid[:, :T] = starts.flip(1).cumsum(1).flip(1) - starts == 0
            mask = self._mask(torch.arange(T, device=self.device))
        x = model.embed(input_ids)
        sin, cos = rotary_sin_cos(model.inv_freq, 0, T, x.dtype)
        slots = torch.arange(T, device=self.device)
        for block, k_cache, v_cache in zip(model.layers, self.k_cache, self.v_cache):
            x = block.step(x, sin, cos, k_cache, v_cache, slots, mask)
        self.position.fill_(T)
        return x

    def _mask(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, L]: the slots a token at each position sees: valid keys up to itself, and itself
        (a pad query attends to itself only, so no softmax row is empty)."""
        seen = self.slots[None, :] <= positions[:, None]
        own = self.slots[None, :] == positions[:, None]
        return ((seen[None] & self.key_valid[:, None, :]) | own[None])[:, None]

    def _step_hidden(self, x: torch.Tensor, starts: Optional[torch.Tensor]) -> torch.Tensor:
        """Writes the token's K/V at `position` (runs past max_length would index out of the cache:
        generate checks lengths first); a starting row's earlier slots are masked from then on."""
        model = self.model
        if starts is not None:
            self.key_valid.logical_and_(~(starts[:, None] & (self.slots[None, :] < self.position)))
        sin, cos = rotary_at(model.inv_freq, self.position, 1, x.dtype)
        slot = self.position.view(1)
        mask = self._mask(slot)
        for block, k_cache, v_cache in zip(model.layers, self.k_cache, self.v_cache):
            x = block.step(x, sin, cos, k_cache, v_cache, slot, mask)
        self.position.add_(1)
        return x
