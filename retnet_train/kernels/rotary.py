"""xPos/RoPE-style rotation of query and key heads, in plain torch (the reference for
triton_rotary.py), and the split of a packed q|k|v projection into rotated heads."""

from __future__ import annotations

import torch


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x, sin, cos):
    """Rotate pairs (2i, 2i+1) of the last dim by position-dependent angles (xPos/RoPE style)."""
    return x * cos + rotate_every_two(x) * sin


def split_heads(qkv, sin, cos, n_heads: int, key_dim: int):
    """A packed projection qkv [B, T, H*K + H*K + H*V] (q, k, v blocks) -> rotated q and k (k scaled
    by K^-1/2) [B, T, H, K] and v [B, T, H, V], each in its own memory (a view kept for the backward
    would keep all of qkv alive)."""
    B, T, width = qkv.shape
    H, K = n_heads, key_dim
    q, k, v = qkv.split([H * K, H * K, width - 2 * H * K], dim=-1)
    q = apply_rotary(q.view(B, T, H, K), sin, cos)
    k = apply_rotary((k * K**-0.5).view(B, T, H, K), sin, cos)
    return q, k, v.contiguous().view(B, T, H, -1)
