"""Chunkwise retention in our own Triton kernels (backend `triton`), for wide heads (key dim 256,
value dim 512) and narrower ones, with document resets, an incoming state and the paper's score
row sums. Same math and state format as torch_retention (states every C = chunk_size tokens).

Per chunk n (C tokens, c0 its first): S_n is the state entering it, dG_n the gradient that its keys
receive from later chunks (triton_retention_states._states_kernel, sequential over chunks per
state tile, stored once in the input dtype: [B*H, N, K, V]). The decayed causal scores within
each chunk are written once per direction (triton_retention_scores._scores_kernel, [B*H, T, C]
in the input dtype: P = gamma^(t-s) q_t . k_s forward, dP = gamma^(t-s) dO_t . v_s backward), and
every output is one pass of triton_retention_apply._apply_kernel over row blocks of a chunk and
column tiles of the output, reading them (or their transpose) instead of recomputing them per tile:
    o  = qd * (q  @ S_n)    + P     @ v     (+ row sums s, fp32, from the scores pass)
    dq = qd * (dO @ S_n^T)  + dP    @ k
    dk = kd * (v  @ dG_n^T) + dP^T  @ q
    dv = kd * (k  @ dG_n)   + P^T   @ dO
with qd_t = gamma^(t-c0+1), kd_s = gamma^(c0+C-1-s) (both 0 across a document start). Only q, k,
v (and the incoming state) are kept for the backward: 3 launches forward (states, scores, o), 6
backward (S and dG in one, dP, dq, dk, P recomputed, dv). Layout [B, T, H, D] in and out, indexed
through strides (no transposing copies).
Decays are fp32 exp2 of log2(gamma) times a (non-negative) distance, all factors <= 1.
Accumulation fp32; o and the chunk states in the input dtype, the final state fp32; fp32 inputs use
IEEE fp32 MMAs.

Document resets: reset [B, T] (True where a document starts) becomes DOC [B, T] int32, the last
document start at or before each token (-1: none); the kernels mask scores, decays and state
carries with it. The final state carries no gradient (training never backpropagates through it;
prefill runs without grad); neither does an incoming state. Needs C, K and V multiples of 16.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .scan_split import scan_split
from .triton_retention_launch import INTERPRET, launch, launch_carry, scan_segments  # noqa: F401 (INTERPRET: tests)

LOG2E = 1.4426950408889634


def supported(C: int, K: int, V: int) -> bool:
    return C % 16 == 0 and K % 16 == 0 and V % 16 == 0


def _bth(x):
    return x.stride(0), x.stride(1), x.stride(2)


def doc_starts(reset):
    """reset [B, T] bool -> [B, T] int32: the last document start at or before t (-1: none)."""
    T = reset.shape[1]
    pos = torch.arange(T, device=reset.device, dtype=torch.int32).expand_as(reset)
    return torch.where(reset, pos, torch.full_like(pos, -1)).cummax(dim=1).values.contiguous()


def _states(x, y, lg2, C, doc, s0=None, z0=None, with_z=False):
    """The forward's chunk-entry states [B*H, N, DX, DY] (y's dtype), z [B*H, N, DX] fp32 (with_z), and
    the final state [B*H, DX, DY] + z [B*H, DX] in fp32 (without z the final state stands in for the z
    buffers, never written). At a small batch the scan runs in segments (launch.scan_segments)."""
    B, T, H, DX = x.shape
    DY = y.shape[-1]
    N = triton.cdiv(T, C)
    SEG, P = scan_split(N, scan_segments(B * H * DX * DY, N, y.device))  # chunks per segment, segments
    S = torch.empty(B * H, N, DX, DY, device=y.device, dtype=y.dtype)
    fin = torch.empty(B * H, P, DX, DY, device=y.device, dtype=torch.float32)  # each segment's own
    Z = torch.empty(B * H, N, DX, device=y.device, dtype=torch.float32) if with_z else fin
    zfin = torch.empty(B * H, P, DX, device=y.device, dtype=torch.float32) if with_z else fin
    seq = _sequence_args(x, y, lg2, C, doc)
    args = dict(
        X=x,
        Y=y,
        S=S,
        Z=Z,
        S0=fin if s0 is None else s0,
        Z0=fin if z0 is None else z0,
        FIN=fin,
        ZFIN=zfin,
        **seq,
        BH=B * H,
        SEG=SEG,
        DX=DX,
        DY=DY,
        WITH_Z=with_z,
        HAS_S0=s0 is not None,
    )
    launch("states", lambda m: (DX // m["BX"], DY // m["BY"], B * H * P), args)
    if P > 1:  # what enters each later segment, added to its states
        shared = ("DOC", "lg2_ptr", "T", "H", "N", "C", "RESET")
        carry = dict(S=S, Z=Z, FIN=fin, ZFIN=zfin, SEG=SEG, P=P, DX=DX, DY=DY, WITH_Z=with_z)
        launch_carry(B * H, {**carry, **{k: seq[k] for k in shared}})
    fin, zfin = fin[:, P - 1], zfin[:, P - 1]
    return S, (Z if with_z else None), fin, (zfin if with_z else None)


def _states_pair(q, k, v, do, lg2, C, doc, s0):
    """The backward's S (recomputed, not kept from the forward) and dG in one launch: [B*H, N, K, V] each."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = triton.cdiv(T, C)
    S = torch.empty(B * H, N, K, V, device=k.device, dtype=v.dtype)
    dG = torch.empty_like(S)
    fin = torch.empty(2, B * H, K, V, device=k.device, dtype=torch.float32)
    args = dict(
        K_=k,
        V_=v,
        S=S,
        S0=fin if s0 is None else s0,
        FIN=fin[0],
        Q_=q,
        DO=do,
        G=dG,
        GFIN=fin[1],
        BH=B * H,
        **_sequence_args(k, v, lg2, C, doc),
        DX=K,
        DY=V,
        HAS_S0=s0 is not None,
    )
    launch("states_pair", lambda m: (K // m["BX"], V // m["BY"], 2 * B * H), args)
    return S, dG


def _strides(t, prefix):
    return dict(zip((f"s{prefix}b", f"s{prefix}t", f"s{prefix}h"), _bth(t)))


def _sequence_args(x, y, lg2, C, doc, y_prefix="y"):
    """What every kernel takes: the document starts, the decays, the sequence's shape and chunking, the
    strides of its two [B, T, H, D] inputs and their precision."""
    _, T, H, _ = x.shape
    return dict(
        DOC=lg2 if doc is None else doc,
        lg2_ptr=lg2,
        T=T,
        H=H,
        N=triton.cdiv(T, C),
        C=C,
        **_strides(x, "x"),
        **_strides(y, y_prefix),
        RESET=doc is not None,
        IEEE=x.dtype == torch.float32,
    )


def _scores(x, b, lg2, C, doc, Z=None):
    """One pass of _scores_kernel: x, b [B, T, H, E] -> the decayed causal scores within each chunk
    [B*H, T, C] (x's dtype), + row sums [B, T, H] fp32 when Z (the z states) is given."""
    B, T, H, E = x.shape
    A = torch.empty(B * H, T, C, device=x.device, dtype=x.dtype)
    # row sums per column block, in slots 16 columns wide (any block width the autotuner picks)
    parts = torch.zeros(B, T, H, C // 16, device=x.device, dtype=torch.float32) if Z is not None else A
    args = dict(
        X=x,
        B=b,
        A=A,
        RS=parts,
        Z=A if Z is None else Z,
        **_sequence_args(x, b, lg2, C, doc, y_prefix="b"),
        E=E,
        ROW_SUMS=Z is not None,
    )
    launch("scores", lambda m: (triton.cdiv(T, m["BR"]), C // m["BC"], B * H), args)
    return A, (parts.sum(-1) if Z is not None else None)


def _apply(x, y, M, A, lg2, C, key_rows, trans_m, doc):
    """One pass of _apply_kernel: x [B, T, H, E], y [B, T, H, D], M [B*H, N, E, D] (trans_m:
    [B*H, N, D, E]), A the scores [B*H, T, C] (key_rows: read transposed) -> out like y."""
    B, T, H, E = x.shape
    D = y.shape[-1]
    out = torch.empty_like(y)
    args = dict(
        X=x,
        A=A,
        Y=y,
        M=M,
        OUT=out,
        **_sequence_args(x, y, lg2, C, doc),
        **_strides(out, "o"),
        E=E,
        D=D,
        KEY_ROWS=key_rows,
        TRANS_M=trans_m,
    )
    launch("apply", lambda m: (triton.cdiv(T, m["BR"]), D // m["BD"], B * H), args)
    return out


def _incoming_state(state, V, row_sums=False):
    """An incoming state [B, H, K, V (+1)] -> S0 [B*H, K, V] fp32 (the scans accumulate in fp32: a
    bf16 model's fp32 state is not rounded) and, with row_sums, its last column z0 [B*H, K] fp32."""
    if state is None:
        return None, None
    B, H, K, _ = state.shape
    s0 = state[..., :V].float().reshape(B * H, K, V).contiguous()
    return s0, (state[..., V].float().reshape(B * H, K).contiguous() if row_sums else None)


def _forward(q, k, v, lg2, C, state, row_sums, doc):
    B, _, H, K = q.shape
    V = v.shape[-1]
    s0, z0 = _incoming_state(state, V, row_sums)
    S, Z, fin, zfin = _states(k, v, lg2, C, doc, s0, z0, with_z=row_sums)
    A, s = _scores(q, k, lg2, C, doc, Z)
    o = _apply(q, v, S, A, lg2, C, key_rows=False, trans_m=False, doc=doc)
    final = fin.view(B, H, K, V)
    if row_sums:
        final = torch.cat([final, zfin.view(B, H, K, 1)], dim=-1)
    return o, s, final  # fp32, as the scan kept it (the recurrent form and fla return fp32 too)


def _backward(q, k, v, do, lg2, C, state, doc):
    B, _, H, K = q.shape
    V = v.shape[-1]
    s0 = _incoming_state(state, V)[0]
    S, dG = _states_pair(q, k, v, do, lg2, C, doc, s0)  # S recomputed, not kept from the forward
    dA = _scores(do, v, lg2, C, doc)[0]  # gamma^(t-s) dO_t . v_s: dq reads it, dk its transpose
    dq = _apply(do, k, S, dA, lg2, C, key_rows=False, trans_m=True, doc=doc)
    del S
    dk = _apply(v, q, dG, dA, lg2, C, key_rows=True, trans_m=True, doc=doc)
    del dA
    A = _scores(q, k, lg2, C, doc)[0]  # the forward's scores, recomputed: dv reads their transpose
    dv = _apply(k, do, dG, A, lg2, C, key_rows=True, trans_m=False, doc=doc)
    return dq, dk, dv


# The kernels as torch custom ops: torch.compile traces them into a block's graph (no graph break),
# and the partitioner may recompute the forward in the backward (it sees the op's flops, below)
# instead of keeping o, when the activation memory budget asks for it.
@torch.library.custom_op("retnet_train::triton_retention", mutates_args=())
def _retention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lg2: Tensor,
    chunk_size: int,
    state: Tensor | None,
    row_sums: bool,
    doc: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> o, row sums (empty without row_sums: an op returns tensors), final state."""
    o, s, final = _forward(q, k, v, lg2, chunk_size, state, row_sums, doc)
    return o, (s if row_sums else q.new_empty(0, dtype=torch.float32)), final


@_retention_op.register_fake
def _(q, k, v, lg2, chunk_size, state, row_sums, doc):
    B, T, H, K = q.shape
    V = v.shape[-1]
    s = q.new_empty((B, T, H) if row_sums else (0,), dtype=torch.float32)
    return torch.empty_like(v), s, v.new_empty(B, H, K, V + row_sums, dtype=torch.float32)


@torch.library.custom_op("retnet_train::triton_retention_backward", mutates_args=())
def _retention_backward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    do: Tensor,
    lg2: Tensor,
    chunk_size: int,
    state: Tensor | None,
    doc: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(q, k, v, do, lg2, chunk_size, state, doc)


@_retention_backward_op.register_fake
def _(q, k, v, do, lg2, chunk_size, state, doc):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, lg2, chunk_size, state, _row_sums, doc = inputs
    ctx.save_for_backward(q, k, v, lg2, state, doc)
    ctx.chunk_size = chunk_size
    ctx.mark_non_differentiable(*output[1:])  # row sums and the final state carry no gradient


def _retention_grad(ctx, do, _ds, _dfinal):
    q, k, v, lg2, state, doc = ctx.saved_tensors
    dq, dk, dv = _retention_backward_op(q, k, v, do.contiguous(), lg2, ctx.chunk_size, state, doc)
    return dq, dk, dv, None, None, None, None, None


_retention_op.register_autograd(_retention_grad, setup_context=_setup_context)


def _retention_flops(q_shape, k_shape, v_shape, lg2_shape, chunk_size, *args, **kwargs) -> int:
    """Forward matmul flops: per token, the causal half of a chunk's scores and their product with v,
    plus q @ S and the state update (k^T v)."""
    B, T, H, K = q_shape
    V = v_shape[-1]
    return 2 * B * T * H * (chunk_size * (K + V) // 2 + 2 * K * V)


def _backward_flops(q_shape, k_shape, v_shape, do_shape, lg2_shape, chunk_size, *args, **kwargs) -> int:
    return 2 * _retention_flops(q_shape, k_shape, v_shape, lg2_shape, chunk_size)


register_flop_formula(torch.ops.retnet_train.triton_retention)(_retention_flops)
register_flop_formula(torch.ops.retnet_train.triton_retention_backward)(_backward_flops)


def triton_retention(q, k, v, log_gamma, chunk_size, state=None, row_sums=True, reset=None):
    """q, k [B, T, H, K], v [B, T, H, V] of one dtype (retention_op casts q, k to v's) -> o [B, T, H, V]
    (unnormalized), row sums s [B, T, H] fp32 or None, final state [B, H, K, V (+1 with row sums)] fp32.
    reset [B, T] bool: True where a document starts (the state is cleared before that token)."""
    q, k, v = (t.contiguous() for t in (q, k, v))  # (no-ops in training) the kernels share q/k and v/dO strides
    if state is not None:
        state = state.detach()
    doc = None if reset is None else doc_starts(reset)
    lg2 = (log_gamma.detach().float() * LOG2E).contiguous()
    o, s, final = _retention_op(q, k, v, lg2, chunk_size, state, row_sums, doc)
    return o, (s if row_sums else None), final
