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


@torch.no_grad()
def retention_row_sums(q, k, log_gamma, chunk_size=64, reset=None):
    B, T, H, K = q.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    qc, kc = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)).view(B, N, C, H, K).permute(0, 3, 1, 2, 4) for t in (q, k))
    lg = log_gamma.float().view(H, 1, 1)
    idx = torch.arange(C, device=q.device, dtype=torch.float32)
    diff = idx.view(C, 1) - idx.view(1, C)
    causal = diff >= 0
    decay = (torch.exp(lg * diff.clamp(min=0)) * causal).view(1, H, 1, C, C)  # gamma^(j-i), i <= j
    q_decay = torch.exp(lg * (idx + 1)).view(1, H, 1, C)  # chunk-start state -> token j
    k_decay = torch.exp(lg * (C - 1 - idx)).view(1, H, 1, C, 1)  # token i -> chunk end
    n = torch.arange(N + 1, device=q.device, dtype=torch.float32)
    gap = n.view(N + 1, 1) - 1 - n[:N].view(1, N)  # chunks between chunk i's end and chunk n's start
    across = torch.exp(lg * C * gap.clamp(min=0)) * (gap >= 0)  # [H, N+1, N]
    if reset is not None:
        r = F.pad(reset, (0, pad)).view(B, N, C)
        seg = torch.cumsum(r.to(torch.int32), dim=-1)
        decay = decay * (seg.unsqueeze(-1) == seg.unsqueeze(-2)).unsqueeze(1)
        q_decay = q_decay * (seg == 0).unsqueeze(1)
        k_decay = k_decay * (seg == seg[..., -1:]).view(B, 1, N, C, 1)
        resets_before = F.pad(torch.cumsum((seg[..., -1] > 0).int(), dim=1), (1, 0))  # resets in chunks < n
        # chunk i's summary reaches chunk n only if no chunk in i+1 .. n-1 has a reset
        alive = resets_before[:, :, None] == resets_before[:, 1:][:, None, :]  # [B, N+1, N]
        across = across.unsqueeze(0) * alive.unsqueeze(1)
    z_intra = decay @ kc  # [B, H, N, C, K]
    summary = (kc * k_decay).sum(dim=3)  # [B, H, N, K]
    z_start = across @ summary  # [B, H, N+1, K]: decayed key sum entering chunk n (n = N: the end)
    s = (qc * z_intra).sum(-1) + q_decay * (qc * z_start[:, :, :N, None, :]).sum(-1)
    s = s.reshape(B, H, N * C)[:, :, :T].transpose(1, 2)
    # z_start[N] is taken at the padded end: undo the pad's extra decay (pads carry no keys)
    z_final = z_start[:, :, N] * torch.exp(-log_gamma.float() * pad).view(1, H, 1)
    return s, z_final
