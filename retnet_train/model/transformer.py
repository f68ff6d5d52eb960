"""Transformer baseline: pre-norm, RoPE, PyTorch SDPA attention (flash when no mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerConfig
from .layers import CausalLMOutput, DecoderLM, FeedForward, apply_rotary, init_weights, make_norm, rotary_sin_cos


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        d = config.d_model
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def qkv(self, x, sin, cos):
        """Rotated q and k and v, each [B, H, T, D]."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rotary(q, sin, cos), apply_rotary(k, sin, cos), v

    def forward(self, x, sin, cos, doc_mask):
        q, k, v = self.qkv(x, sin, cos)
        if doc_mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask)
        return self.out_proj(o.transpose(1, 2).reshape(*x.shape[:2], -1))

    def step(self, x, sin, cos, k_cache, v_cache, slots, mask=None):
        """New tokens x [B, T, d] written to the KV cache [B, H, L, D] at `slots` [T] (their positions),
        then attending over the cache: mask [B, 1, T, L] says which slots each token sees; None: the new
        tokens are the whole sequence so far (slots 0..T-1, causal). Capturable with a mask (constant
        shapes)."""
        q, k, v = self.qkv(x, sin, cos)
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(*x.shape[:2], -1))


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attention_norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.ffn = FeedForward(config.d_model, config.ffn_dim, config.ffn_type, config.activation)

    def forward(self, x, sin, cos, doc_mask):
        x = x + self.attention(self.attention_norm(x), sin, cos, doc_mask)
        return x + self.ffn(self.ffn_norm(x))

    def step(self, x, sin, cos, k_cache, v_cache, slots, mask=None):
        """The block on new tokens with its KV cache (Attention.step)."""
        x = x + self.attention.step(self.attention_norm(x), sin, cos, k_cache, v_cache, slots, mask)
        return x + self.ffn(self.ffn_norm(x))


class TransformerForCausalLM(DecoderLM):
    def __init__(self, config: TransformerConfig):
        super().__init__(config, [TransformerBlock(config) for _ in range(config.n_layers)])
        init_weights(self, config, gains={"qkv_proj": 2**-0.5, "out_proj": 1.0})
        if config.init == "torchscale":
            # torchscale's attention has separate q, k, v weights, each xavier with gain 2^-0.5: on the
            # fused [3d, d] weight xavier's fan (4d, not 2d) would draw them sqrt(2) too small
            with torch.no_grad():
                for block in self.layers:
                    for rows in block.attention.qkv_proj.weight.chunk(3):
                        nn.init.xavier_uniform_(rows, gain=2**-0.5)

    def constants(self) -> dict:
        hd = self.config.head_dim
        # Standard RoPE frequencies base^(-2i/d), one per rotation pair.
        return {"inv_freq": 1.0 / self.config.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)}

    def forward(self, input_ids, labels=None, doc_starts=None, return_logits: bool = True) -> CausalLMOutput:
        x = self.embed(input_ids)
        T = input_ids.shape[1]
        sin, cos = rotary_sin_cos(self.inv_freq, 0, T, x.dtype)
        doc_mask = None
        if doc_starts is not None and doc_starts.shape != input_ids.shape:  # as RetNet: name it, not a broadcast
            raise ValueError(f"doc_starts shape {tuple(doc_starts.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if doc_starts is not None and self.config.document_masking:
            seg = torch.cumsum(doc_starts.long(), dim=1)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            doc_mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # [B, 1, T, T]
        for block in self.layers:
            x = block(x, sin, cos, doc_mask)
        return self.head(x, labels, return_logits)
