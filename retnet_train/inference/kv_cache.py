"""KV-cache decoding for the Transformer baseline (TransformerForCausalLM), outside the model
file: runs the model's own blocks with a preallocated cache [B, H, max_length, D] per layer.

The step attends over the whole cache with a mask (constant shapes, position in a device
tensor), so it is capturable in a CUDA graph like RetNet's step. Left padding: pads are masked
out as keys; a pad query attends to itself only (no empty softmax rows).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..model import TransformerForCausalLM
from ..model.layers import apply_rotary, rotary_at, rotary_sin_cos


class KVCacheDecoder:
    def __init__(self, model: TransformerForCausalLM, batch_size: int, max_length: int):
        if not isinstance(model, TransformerForCausalLM):
            raise TypeError(f"KVCacheDecoder needs a TransformerForCausalLM, got {type(model).__name__}")
        cfg = model.config
        self.model, self.cfg, self.batch_size, self.max_length = model, cfg, batch_size, max_length
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
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
        # Only the position: a step writes slot `position` before reading slots <= position, so
        # slots written by a discarded step are overwritten before use (cloning the cache would
        # double its memory: 34 GB at 6.7B, 8k, batch 8).
        return [self.position.clone()]

    def restore(self, snap: List[torch.Tensor]) -> None:
        self.position.copy_(snap[0])

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_cache, *self.v_cache))

    def _qkv(self, attn, h, sin, cos):
        B, T, _ = h.shape
        q, k, v = attn.qkv_proj(h).view(B, T, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rotary(q, sin, cos), apply_rotary(k, sin, cos), v

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, doc_starts: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None, piece: int = 0) -> torch.Tensor:
        """Prompt [B, T] (left-padded; doc_starts marks each row's first real token) -> last
        logits [B, V]; fills cache slots 0..T-1. chunk_size/piece: accepted for RetNet parity."""
        model = self.model
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"prefill: batch of {B} prompts, decoder was built for {self.batch_size}")
        if not 1 <= T < self.max_length:
            raise ValueError(f"prefill: prompt of {T} tokens does not fit max_length={self.max_length} (needs room for one new token)")
        mask = None
        self.key_valid.fill_(True)
        if doc_starts is not None and bool(doc_starts[:, 1:].any()):
            valid = doc_starts.long().cumsum(1) > 0  # pads lie before each row's first real token
            self.key_valid[:, :T] = valid
            eye = torch.eye(T, dtype=torch.bool, device=self.device)
            mask = ((torch.ones(T, T, dtype=torch.bool, device=self.device).tril() & valid[:, None, :]) | eye)[:, None]
        x = model.embed(input_ids)
        sin, cos = rotary_sin_cos(model.inv_freq, 0, T, x.dtype)
        for i, block in enumerate(model.layers):
            q, k, v = self._qkv(block.attention, block.attention_norm(x), sin, cos)
            self.k_cache[i][:, :, :T] = k
            self.v_cache[i][:, :, :T] = v
            if mask is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + block.attention.out_proj(o.transpose(1, 2).reshape(B, T, -1))
            x = x + block.ffn(block.ffn_norm(x))
        self.position.fill_(T)
        return model.lm_head(model.norm(x[:, -1:]))[:, 0]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row [B] -> logits [B, V]; writes its K/V at `position`. Capturable
        (runs past max_length would index out of the cache: generate checks lengths first)."""
        model = self.model
        B = tokens.shape[0]
        x = model.embed_tokens(tokens.view(B, 1))
        if self.cfg.embed_scale:
            x = x * self.cfg.d_model ** 0.5
        sin, cos = rotary_at(model.inv_freq, self.position, x.dtype)
        pos = self.position.view(1)
        mask = ((self.slots <= self.position)[None, :] & self.key_valid)[:, None, None, :]  # [B, 1, 1, L]
        for i, block in enumerate(model.layers):
            q, k, v = self._qkv(block.attention, block.attention_norm(x), sin, cos)
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask)
            x = x + block.attention.out_proj(o.transpose(1, 2).reshape(B, 1, -1))
            x = x + block.ffn(block.ffn_norm(x))
        self.position.add_(1)
        return model.lm_head(model.norm(x))[:, 0]
