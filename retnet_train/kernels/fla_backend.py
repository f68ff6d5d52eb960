"""fla-core Triton kernels behind the torch backend's interface (see kernels/__init__.py).

fla's retention uses the same decays gamma_h = 1 - 2^(-5-h) and no normalization. The score row
sums that our normalization needs (no gradient, as in torchscale) come from row_sums.py when no
state comes in (training, prefill): a few large torch ops, ~10x cheaper than a second fla call.
With an incoming state they come from an extra forward-only fla call whose values are ones.
"""

from __future__ import annotations

import torch
from fla.ops.retention import chunk_retention, fused_recurrent_retention

from .row_sums import retention_row_sums

ROW_SUM_WIDTH = 16  # smallest value width the kernels tile well; all columns are equal


def _call(q, k, v, mode, chunk_size, cu_seqlens, state):
    if mode == "recurrent":
        return fused_recurrent_retention(
            q, k, v, scale=1.0, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens
        )
    # fla picks its own chunk size (64) for training; the result does not depend on it.
    return chunk_retention(q, k, v, scale=1.0, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)


def _packed(reset):
    """Flatten [B, T] rows into one sequence with a boundary at every row and document start."""
    B, T = reset.shape
    starts = reset.clone()
    starts[:, 0] = True
    idx = torch.nonzero(starts.flatten()).flatten()
    cu_seqlens = torch.cat([idx, idx.new_tensor([B * T])])
    last_doc = starts.sum(dim=1).cumsum(0) - 1  # index of each row's last document
    return cu_seqlens, last_doc


def fla_retention(q, k, v, log_gamma, mode, chunk_size, reset, state, row_sums):
    B, T, H, K = q.shape
    V = v.shape[-1]
    s = z_final = None
    if row_sums and state is None:
        s, z_final = retention_row_sums(q, k, log_gamma, 64, reset)
        z_final = z_final.unsqueeze(-1)
    cu_seqlens = last_doc = None
    if reset is not None:  # (no incoming state: the dispatcher sends that case to torch)
        cu_seqlens, last_doc = _packed(reset)
        q, k, v = (t.reshape(1, B * T, H, t.shape[-1]) for t in (q, k, v))
    main_state = z_state = None
    if state is not None:
        state = state.float()
        main_state = state[..., :V].contiguous()
        if row_sums:
            z_state = state[..., V:].expand(B, H, K, ROW_SUM_WIDTH).contiguous()
    o, final = _call(q, k, v, mode, chunk_size, cu_seqlens, main_state)
    if row_sums and state is not None:
        with torch.no_grad():
            ones = q.new_ones(q.shape[:-1] + (ROW_SUM_WIDTH,))
            s, z_final = _call(q.detach(), k.detach(), ones, mode, chunk_size, cu_seqlens, z_state)
            s = s[..., 0].reshape(B, T, H)
    if last_doc is not None:  # per-document states -> each row's last (z_final is per row already)
        final = final[last_doc]
    if z_final is not None:
        final = torch.cat([final, z_final[..., :1]], dim=-1)
    return o.reshape(B, T, H, V), s, final
