"""Score row sums s_t = q_t . sum_{m <= t, same document} gamma^(t-m) k_m, the quantity the
paper's normalization needs, computed without a T x T matrix and without a sequential loop:
inside a chunk with a C x C decay matrix, across chunks with one N x N decay matrix (all
decays <= 1, so nothing overflows; far-apart chunks underflow to an exact 0).

Forward-only (the normalization detaches it). Layout [B, T, H, K]; returns s [B, T, H] and the
final decayed key sum z [B, H, K] (the state's extra column), both fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .torch_retention import chunk_decays, scan_weights


@torch.no_grad()
def retention_row_sums(q, k, log_gamma, chunk_size=64, reset=None):
    B, T, H, K = q.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    qc, kc = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)).view(B, N, C, H, K).permute(0, 3, 1, 2, 4) for t in (q, k))
    mask, q_decay, k_decay, reset_chunks = chunk_decays(
        log_gamma.float(), C, N, None if reset is None else F.pad(reset, (0, pad))
    )
    across = scan_weights(log_gamma.float(), C, N, reset_chunks)[..., 1:]  # chunk i's summary -> chunk n's start
    z_intra = mask @ kc  # [B, H, N, C, K]
    summary = (kc * k_decay).sum(dim=3)  # [B, H, N, K]
    z_start = across @ summary  # [B, H, N+1, K]: decayed key sum entering chunk n (n = N: the end)
    s = (qc * z_intra).sum(-1) + q_decay.squeeze(-1) * (qc * z_start[:, :, :N, None, :]).sum(-1)
    s = s.reshape(B, H, N * C)[:, :, :T].transpose(1, 2)
    # z_start[N] is taken at the padded end: undo the pad's extra decay (pads carry no keys)
    z_final = z_start[:, :, N] * torch.exp(-log_gamma.float() * pad).view(1, H, 1)
    return s, z_final
