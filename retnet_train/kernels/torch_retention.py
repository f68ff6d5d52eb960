"""Retention in plain torch: the three equivalent forms, with document resets and state.

Shapes: q, k [B, H, T, K]; v [B, H, T, V]; log_gamma [H] (log of each head's decay);
reset [B, T] bool, True where a new document starts (the state is cleared *before* that
token); state [B, H, K, V]. Every form returns (o, final_state) with the unnormalized
o_t = sum_{m <= t, same document} gamma^(t-m) (q_t . k_m) v_m, so the forms are equal up
to rounding: o in the inputs' dtype, the final state in fp32 at least (fp64 for fp64 inputs).
keep_state (chunkwise and parallel forms): the caller uses the final state, so for bf16 inputs it is
re-summed in fp32 (_final_state); training, which discards it, passes False and gets the bf16 scan's
last row cast to fp32, skipping that pass (about a tenth of the forward on CPU).
(Normalization lives in the MSR module; it needs only position-wise factors.)

The chunkwise and parallel forms keep only q, k, v (and the incoming state and resets) for
backward and recompute the rest there (ChunkRetention), as flash attention does. This path runs on
any device: CPU, the tests' reference, and GPU training with retention_backend=torch.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch


def recurrent_retention(q, k, v, log_gamma, reset=None, state=None):
    """S_t = gamma S_{t-1} + k_t^T v_t ;  o_t = q_t S_t. One token at a time (decoding), in fp32 at least
    whatever the inputs' dtype (bf16 holds no decay between 1 - 2^-9 and 1: the slower heads would
    never decay): o in q's dtype, the state in fp32 (fp64 for fp64 inputs)."""
    B, H, T, K = q.shape
    dtype, acc = q.dtype, _decay_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    gamma = log_gamma.to(acc).exp().view(1, H, 1, 1)
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.to(acc)
    outs = []
    for t in range(T):
        decay = gamma if reset is None else gamma * (~reset[:, t]).to(acc).view(B, 1, 1, 1)
        S = S * decay + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, dim=2).to(dtype), S


def _chunks(x, C):
    B, H, T, D = x.shape
    return x.reshape(B, H, T // C, C, D)


def _decay_dtype(dtype):
    """Decays are computed in fp32, or fp64 for fp64 inputs, whatever the input precision."""
    return torch.promote_types(dtype, torch.float32)


def chunk_decays(log_gamma, C, N, reset=None):
    """The decays of the chunkwise form, in log_gamma's dtype, for N chunks of C tokens:
    mask [B|1, H, N|1, C, C] = gamma^(j-i) for i <= j in the same document (intra-chunk scores);
    q_decay [B|1, H, N|1, C, 1] = gamma^(j+1), 0 after a reset (chunk-start state -> token j);
    k_decay [B|1, H, N|1, C, 1] = gamma^(C-1-i), 0 before the chunk's last document (token -> chunk end);
    reset_chunks [B, N] (None without resets): chunks holding a document start."""
    H = log_gamma.shape[0]
    lg = log_gamma.view(H, 1, 1)
    idx = torch.arange(C, device=log_gamma.device, dtype=log_gamma.dtype)
    diff = idx.view(C, 1) - idx.view(1, C)
    causal = diff >= 0
    # masked before exp so nothing overflows
    mask = (torch.exp(lg * diff.masked_fill(~causal, 0)) * causal).view(1, H, 1, C, C)
    q_decay = torch.exp(lg * (idx + 1)).view(1, H, 1, C, 1)
    k_decay = torch.exp(lg * (C - 1 - idx)).view(1, H, 1, C, 1)
    if reset is None:
        return mask, q_decay, k_decay, None
    B = reset.shape[0]
    seg = torch.cumsum(reset.view(B, N, C).to(torch.int32), dim=-1)  # resets so far in chunk
    mask = mask * (seg.unsqueeze(-1) == seg.unsqueeze(-2)).view(B, 1, N, C, C)
    q_decay = q_decay * (seg == 0).view(B, 1, N, C, 1)  # state reaches j only if no reset up to j
    k_decay = k_decay * (seg == seg[..., -1:]).view(B, 1, N, C, 1)  # only the chunk's last document
    return mask, q_decay, k_decay, seg[..., -1] > 0


def scan_weights(log_gamma, C, N, reset_chunks=None):
    """W[n, j]: how much of summary j reaches the start of chunk n (n = N: the end). Summary 0 is
    the incoming state, summary j >= 1 is chunk j-1's keys decayed to its end; W = gamma^(C(n-j))
    for j <= n. With resets, a summary survives only if no chunk between it and n has a reset.
    All weights are <= 1, so nothing overflows and far-apart chunks underflow to an exact 0."""
    H = log_gamma.shape[0]
    n = torch.arange(N + 1, device=log_gamma.device, dtype=log_gamma.dtype)
    gap = n.view(N + 1, 1) - n.view(1, N + 1)
    W = torch.exp(log_gamma.view(H, 1, 1) * C * gap.clamp(min=0)) * (gap >= 0)  # [H, N+1, N+1]
    if reset_chunks is None:
        return W.unsqueeze(0)
    before = torch.nn.functional.pad(torch.cumsum(reset_chunks.to(torch.int32), dim=1), (1, 0))  # [B, N+1]
    alive = before.unsqueeze(2) == before.unsqueeze(1)  # no reset in the chunks between j and n
    return W.unsqueeze(0) * alive.unsqueeze(1)  # [B, H, N+1, N+1]


def _equal_full_chunks(q, k, v, log_gamma, reset, state, C, row_sums=False, recompute=True, keep_state=True):
    """Chunkwise retention for T divisible by C: parallel inside each chunk, recurrent across.

    recompute: the backward keeps only q, k, v (and the incoming state and resets) and recomputes the
    intra-chunk scores and the per-chunk states (ChunkRetention), so what a layer keeps per token does
    not depend on the chunk size; otherwise autograd keeps the chunk states [B, H, T/C + 1, K, V]
    (faster, more memory: docs/benchmarks.md). Returns (o, final_state) or, with row_sums, (o, final_state, s).
    """
    if recompute:
        o, final, s = ChunkRetention.apply(q, k, v, log_gamma, reset, state, C, row_sums, keep_state)
    else:
        o, final, s = chunk_forward(q, k, v, log_gamma, reset, state, C, row_sums, keep_state)
    return (o, final, s) if row_sums else (o, final)


def _chunk_setup(q, log_gamma, reset, C):
    """The chunk count N and the decays (chunk_decays, scan_weights), in fp32 at least."""
    N = q.shape[2] // C
    log_gamma = log_gamma.to(_decay_dtype(q.dtype))
    mask, q_decay, k_decay, reset_chunks = chunk_decays(log_gamma, C, N, reset)
    return N, mask, q_decay, k_decay, scan_weights(log_gamma, C, N, reset_chunks)


def _chunk_states(kc, vc, k_decay, W, state):
    """The state entering each chunk (the last: the final state), [B, H, N+1, K, V] in the inputs'
    dtype, the chunk summaries k^T v [B, H, N, K, V] and their keys decayed to their chunk's end.
    The recurrence across chunks is a linear scan with constant decays, done as one (N+1) x N matrix
    product over the chunk summaries instead of N sequential steps: large batched GEMMs only (fast on
    GPU, traceable by torch.compile)."""
    B, H, N, _, K = kc.shape
    V = vc.shape[-1]
    dtype = kc.dtype
    k_decayed = kc * k_decay.to(dtype)
    chunk_kv = k_decayed.transpose(-1, -2) @ vc  # [B, H, N, K, V]
    W_chunks = W[..., 1:].to(dtype).contiguous()  # (contiguous: a sliced operand falls off the fast GEMMs)
    states = W_chunks @ chunk_kv.reshape(B, H, N, K * V)  # [B, H, N+1, K*V]
    if state is not None:
        states = states + W[..., :1].to(dtype) * state.to(dtype).reshape(B, H, 1, K * V)
    return states.view(B, H, N + 1, K, V), chunk_kv, k_decayed


def _final_state(states, chunk_kv, W, state):
    """The state after the last chunk in fp32 at least (the recurrent form's and the Triton kernels'
    format): in bf16 it is the scan's last row, summed in fp32 from the chunk summaries with fp32
    decays, so that a prefill does not hand decoding a state rounded to bf16 (nor an fp32 incoming
    state rounded on its way through)."""
    B, H, N, K, V = chunk_kv.shape
    acc = _decay_dtype(states.dtype)
    if acc == states.dtype:
        return states[:, :, N]
    final = W[..., N:, 1:].to(acc) @ chunk_kv.to(acc).reshape(B, H, N, K * V)  # [B, H, 1, K*V]
    if state is not None:
        final = final + W[..., N:, :1].to(acc) * state.to(acc).reshape(B, H, 1, K * V)
    return final.view(B, H, K, V)


def chunk_forward(q, k, v, log_gamma, reset, state, C, row_sums=False, keep_state=True):
    """The chunkwise form in plain torch ops, for T divisible by C: (o, final_state, s or None).
    Differentiable by autograd as written (the reference for ChunkRetention's backward).

    row_sums: also return s_t = sum_m D_tm (q_t . k_m) (fp32, no gradient; the paper's
    normalization needs it) from the same intermediates; the state then carries the decayed key
    sum z as an extra last column, [B, H, K, V+1].
    keep_state: the final state exactly (_final_state); False: the scan's last row, cast (module docstring).
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    N, mask, q_decay, k_decay, W = _chunk_setup(q, log_gamma, reset, C)
    qc, kc, vc = _chunks(q, C), _chunks(k, C), _chunks(v, C)
    z0 = None
    if row_sums and state is not None:
        state, z0 = state[..., :V], state[..., V]
    dtype = q.dtype
    scores = (qc @ kc.transpose(-1, -2)) * mask.to(dtype)
    o = scores @ vc  # intra-chunk: the parallel form on each chunk
    states, chunk_kv, k_decayed = _chunk_states(kc, vc, k_decay, W, state)
    o = o + (qc @ states[:, :, :N]) * q_decay.to(dtype)  # inter-chunk: each chunk's incoming state
    final = _final_state(states, chunk_kv, W, state) if keep_state else states[:, :, N].to(_decay_dtype(dtype))
    o = o.reshape(B, H, T, V)
    if not row_sums:
        return o, final, None
    acc = _decay_dtype(dtype)
    with torch.no_grad():  # in acc: fp32 at least
        z = W[..., 1:].to(acc) @ k_decayed.to(acc).sum(3)  # decayed key sums entering each chunk, [B, H, N+1, K]
        if z0 is not None:
            z = z + W[..., :1].to(acc) * z0.to(acc).unsqueeze(2)
        s = scores.to(acc).sum(-1) + (qc.to(acc) @ z[:, :, :N].unsqueeze(-1)).squeeze(-1) * q_decay.squeeze(-1)
    return o, torch.cat([final, z[:, :, N].unsqueeze(-1).to(final.dtype)], dim=-1), s.reshape(B, H, T)


def chunk_backward(q, k, v, log_gamma, reset, state, C, do, dfinal):
    """Gradients of chunk_forward's o and final state (without the row-sum column) with respect to
    q, k, v and the incoming state (None without one), recomputing the scores and the chunk states
    from q, k, v. Each intermediate lives only inside this call."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    N, mask, q_decay, k_decay, W = _chunk_setup(q, log_gamma, reset, C)
    qc, kc, vc, doc = _chunks(q, C), _chunks(k, C), _chunks(v, C), _chunks(do.to(q.dtype), C)
    dtype = q.dtype
    mask = mask.to(dtype)
    d_scores = (doc @ vc.transpose(-1, -2)) * mask
    dq = d_scores @ kc
    dk = d_scores.transpose(-1, -2) @ qc
    del d_scores
    dv = ((qc @ kc.transpose(-1, -2)) * mask).transpose(-1, -2) @ doc
    states, _, k_decayed = _chunk_states(kc, vc, k_decay, W, state)
    do_decayed = doc * q_decay.to(dtype)
    dq = dq + do_decayed @ states[:, :, :N].transpose(-1, -2)
    del states
    d_states = torch.cat([qc.transpose(-1, -2) @ do_decayed, dfinal.to(dtype).view(B, H, 1, K, V)], dim=2)
    d_states = d_states.view(B, H, N + 1, K * V)
    d_chunk_kv = (W[..., 1:].to(dtype).transpose(-1, -2) @ d_states).view(B, H, N, K, V)
    dk = dk + (vc @ d_chunk_kv.transpose(-1, -2)) * k_decay.to(dtype)
    dv = dv + k_decayed @ d_chunk_kv
    d_state = None
    if state is not None:
        d_state = (W[..., :1].to(dtype).transpose(-1, -2) @ d_states).view(B, H, K, V).to(state.dtype)
    return dq.reshape(B, H, T, K), dk.reshape(B, H, T, K), dv.reshape(B, H, T, V), d_state


def _backward_for(q):
    """chunk_backward, compiled on GPU (CPU runs it eagerly: the tests' path, no compiler needed)."""
    return _compiled_chunk_backward() if q.is_cuda else chunk_backward


@functools.lru_cache(maxsize=None)
def _compiled_chunk_backward():
    return torch.compile(chunk_backward, fullgraph=True)


@torch.library.custom_op("retnet_train::chunk_retention_backward", mutates_args=())
def _backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    reset: Optional[torch.Tensor],
    state: Optional[torch.Tensor],
    C: int,
    do: torch.Tensor,
    dfinal: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunk_backward as one opaque op: the compiled graph cannot merge its recomputed scores and
    states with the forward's and then keep them (its common-subexpression pass would). On GPU the
    body is compiled on its own: eager, its masking, decay and layout copies ran as ~19 unfused
    elementwise kernels per call (a fifth of a 1.3B training step's GPU time, docs/benchmarks.md)."""
    dq, dk, dv, d_state = _backward_for(q)(q, k, v, log_gamma, reset, state, C, do, dfinal)
    return dq, dk, dv, q.new_empty(0) if d_state is None else d_state


@_backward_op.register_fake
def _(q, k, v, log_gamma, reset, state, C, do, dfinal):
    d_state = q.new_empty(0) if state is None else state.new_empty(state.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_state


class ChunkRetention(torch.autograd.Function):
    """chunk_forward whose backward keeps q, k, v, the incoming state and the resets, nothing of
    size T x C or N x K x V: the scores and chunk states are recomputed (chunk_backward). The decays
    (log_gamma) are constants: they get no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, log_gamma, reset, state, C, row_sums, keep_state):
        o, final, s = chunk_forward(q, k, v, log_gamma, reset, state, C, row_sums, keep_state)
        ctx.save_for_backward(q, k, v, log_gamma, reset, state)
        ctx.C, ctx.row_sums = C, row_sums
        if s is None:
            s = q.new_empty(0)
        ctx.mark_non_differentiable(s)
        return o, final, s

    @staticmethod
    def backward(ctx, do, dfinal, _ds):
        q, k, v, log_gamma, reset, state = ctx.saved_tensors
        V = v.shape[-1]
        if ctx.row_sums:  # the row-sum column (z) carries no gradient
            dfinal = dfinal[..., :V]
            if state is not None:
                state = state[..., :V]
        dq, dk, dv, d_state = _backward_op(q, k, v, log_gamma, reset, state, ctx.C, do, dfinal.contiguous())
        if state is None:
            d_state = None
        elif ctx.row_sums:
            d_state = torch.cat([d_state, d_state.new_zeros(d_state.shape[:-1] + (1,))], dim=-1)
        return dq, dk, dv, None, None, d_state, None, None, None


def chunkwise_retention(
    q, k, v, log_gamma, chunk_size, reset=None, state=None, row_sums=False, recompute=True, keep_state=True
):
    """Chunkwise-recurrent form: O(T C) work, linear in T. A last partial chunk runs on its own, from
    the exact state of the full chunks whatever keep_state, so o does not depend on it."""
    T = q.shape[2]
    full = (T // chunk_size) * chunk_size
    pieces = []
    for lo, hi in ((0, full), (full, T)):
        if hi > lo:
            out = _equal_full_chunks(
                q[:, :, lo:hi],
                k[:, :, lo:hi],
                v[:, :, lo:hi],
                log_gamma,
                None if reset is None else reset[:, lo:hi],
                state,
                chunk_size if hi == full else hi - lo,
                row_sums,
                recompute,
                keep_state or hi < T,  # a hand-off to the partial chunk feeds its o
            )
            state = out[1]
            pieces.append(out)
    if len(pieces) == 1:
        return pieces[0]
    o = torch.cat([p[0] for p in pieces], dim=2)
    return (o, state) if not row_sums else (o, state, torch.cat([p[2] for p in pieces], dim=2))


def parallel_retention(q, k, v, log_gamma, reset=None, state=None, row_sums=False, recompute=True, keep_state=True):
    """Parallel form (Q K^T ⊙ D) V over the whole sequence: the single-chunk case."""
    return _equal_full_chunks(q, k, v, log_gamma, reset, state, q.shape[2], row_sums, recompute, keep_state)


def retention(q, k, v, log_gamma, mode, chunk_size, reset=None, state=None):
    if mode == "parallel":
        return parallel_retention(q, k, v, log_gamma, reset, state)
    if mode == "chunkwise":
        return chunkwise_retention(q, k, v, log_gamma, chunk_size, reset, state)
    if mode == "recurrent":
        return recurrent_retention(q, k, v, log_gamma, reset, state)
    raise ValueError(f"mode: {mode!r} is not one of ['parallel', 'chunkwise', 'recurrent']")
