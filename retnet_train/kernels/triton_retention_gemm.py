"""GEMM-shaped Triton kernels for chunkwise retention (no document resets), a second design for
comparison with triton_retention.py (the `triton` backend): `python -m
retnet_train.bench.retention_kernels --backends triton-gemm@256,triton@256` times both.

Hybrid scheme (same math and state format as torch_retention._equal_full_chunks), every kernel
GEMM-shaped, with its MMA operands loaded straight from memory (pipelined; nothing is scaled or
transposed in registers before an MMA; per-token decays go on a decayed copy or the accumulator):
  * states only every C tokens (C = chunk_size, e.g. 256): a decayed copy k * k_decay (one
    memory-bound pass, decay_kernel), then each chunk's summary (k * k_decay)^T v as a plain
    batched GEMM (_summary_kernel); the cross-chunk scan is one torch GEMM with the (N+1) x N
    decay matrix from scan_weights (big cuBLAS GEMMs; nothing sequential);
  * the intra-chunk scores gamma^(t-s) q_t . k_s are computed once per causal block (_scores_kernel,
    the lower triangle only; zeros above) into a [B*H, T, C] buffer in the input dtype, with the
    paper's score row sums (fp32, no gradient) from the unrounded scores;
  * one output kernel (_out_kernel) for o = q_decay * (q S_n) + A v, and for the gradients
    dq = q_decay * (dO S_n^T) + dA k, dk = k_decay * (v G_n^T) + dA^T q, dv = k_decay * (k G_n) + A^T dO
    (dA = gamma^(t-s) dO_t . v_s from the same scores kernel; G_n from the state gradients
    dS_n = (q * q_decay)^T dO, the same decay + summary kernels, and a transposed scan GEMM).
    Only q, k, v are saved; the states and scores are recomputed in the backward.
Layout [B, T, H, D] in and out, indexed through strides (no transposing copies). This module is
the host side; the kernels and their autotune configs are in triton_retention_gemm_kernels.py.
Decays are fp32, exp2 of log2(gamma) * distance with the distance masked to >= 0 first, so every
factor is <= 1 and nothing overflows. Accumulation is fp32; o, states, scores in the input dtype.

Speed (H200, B1 T8192 H8 K256 V512, fwd+bwd with row sums; docs/benchmarks.md): exact (GPU test
at K256/V512 bf16 passes) but slower than the compiled torch form (3.11 ms at C=256, 3.31 at C=128,
against 1.43). Profile: _out_kernel 32%, _summary_kernel 17%, _scores_kernel 15%, decay_kernel 8%,
i.e. the time is spread over many passes each well below GEMM speed.
Extra memory: the scores buffer(s), [B*H, T, C] each (one in the forward, two in the backward).

Not handled here: document resets, and chunk sizes that are not a multiple of 16. The final state
carries no gradient (training never backpropagates through it; prefill runs without grad); neither
does an incoming state.
"""

from __future__ import annotations

import torch
import triton

from .torch_retention import scan_weights
from .triton_retention_gemm_kernels import INTERPRET, block_size, decay_kernel, out_tuned, scores_tuned, summary_tuned

LOG2E = 1.4426950408889634

# Under the interpreter each kernel runs one fixed block shape (below); tests may override them
# per kernel ("summary", "scores", "out") to check the GPU tuner's shapes and block mixes.
INTERP_META: dict = {}


def _imeta(name, **default):
    return {**default, **INTERP_META.get(name, {})} if INTERPRET else {}


def _pow2(x):
    return max(16, triton.next_power_of_2(x))


def _bth(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _decayed(x, lg2, C, query, with_z):
    """d_t x_t (see decay_kernel) in x's dtype and layout, + [B*H, N, DX] fp32 decayed sums."""
    B, T, H, DX = x.shape
    N = -(-T // C)
    xd = torch.empty_like(x)
    z = torch.empty(B * H, N, DX, device=x.device, dtype=torch.float32) if with_z else xd
    decay_kernel[(N, B * H)](
        x,
        xd,
        z,
        lg2,
        T,
        H,
        C,
        DX,
        *_bth(x),
        BT=min(32, _pow2(C)),
        BX=_pow2(DX),
        QUERY=query,
        WITH_Z=with_z,
        num_warps=4,
    )
    return xd, (z if with_z else None)


def _summaries(xd, y, C, out_dtype):
    """[B*H, N, DX, DY] chunk summaries xd_chunk^T y_chunk."""
    B, T, H, DX = xd.shape
    DY = y.shape[-1]
    N = -(-T // C)
    out = torch.empty(B * H, N, DX, DY, device=xd.device, dtype=out_dtype)
    grid = lambda meta: (triton.cdiv(DX, meta["BX"]) * triton.cdiv(DY, meta["BY"]), N, B * H)  # noqa: E731
    meta = _imeta("summary", BX=min(64, _pow2(DX)), BY=min(64, _pow2(DY)), BT=block_size(C), num_warps=4)
    summary_tuned[grid](xd, y, out, T, H, C, DX, DY, *_bth(xd), *_bth(y), IEEE=xd.dtype == torch.float32, **meta)
    return out


def _scores(x, y, lg2, C, z=None, row_sums=False):
    """P [B*H, T, C] (x_t . y_s decayed, 0 above the diagonal) in x's dtype, + row sums [B, T, H]."""
    B, T, H, E = x.shape
    P = torch.empty(B * H, T, C, device=x.device, dtype=x.dtype)
    rs = torch.empty(B, T, H, device=x.device, dtype=torch.float32) if row_sums else P
    grid = lambda meta: (triton.cdiv(T, meta["BT"]), B * H)  # noqa: E731
    meta = _imeta("scores", BT=block_size(C), BE=min(32, _pow2(E)), num_warps=4)
    scores_tuned[grid](
        x,
        y,
        P,
        rs,
        z if row_sums else P,
        lg2,
        T,
        H,
        C,
        E,
        *_bth(x),
        *_bth(y),
        ROW_SUMS=row_sums,
        IEEE=x.dtype == torch.float32,
        **meta,
    )
    return P, (rs if row_sums else None)


def _out(x, M, P, y, lg2, C, trans_m, trans_p, query):
    """x [B,T,H,E], M [B*H, N(+1), ...] per-chunk matrices, P [B*H, T, C], y [B,T,H,D] -> [B,T,H,D]."""
    B, T, H, E = x.shape
    D = y.shape[-1]
    out = torch.empty_like(y)
    grid = lambda meta: (triton.cdiv(T, meta["BT"]), triton.cdiv(D, meta["BD"]), B * H)  # noqa: E731
    bt = block_size(C)
    meta = _imeta("out", BT=bt, BD=min(64, _pow2(D)), BE=min(32, _pow2(E)), BS=min(bt, 32), num_warps=4)
    out_tuned[grid](
        x,
        M,
        P,
        y,
        out,
        lg2,
        T,
        H,
        C,
        E,
        D,
        *_bth(x),
        *_bth(y),
        *_bth(out),
        M.stride(0),
        M.stride(1),
        TRANS_M=trans_m,
        TRANS_P=trans_p,
        QUERY=query,
        IEEE=x.dtype == torch.float32,
        **meta,
    )
    return out


def _states(k, v, log_gamma, lg2, C, state, with_z):
    """States entering each chunk, [B*H, N+1, K, V] in v's dtype (index N: after the last full
    chunk), the matching row-sum states z [B*H, N+1, K] fp32, the final state, and the scan's
    decay weights W [H, N+1, N+1] (fp32; the backward's transposed scan reuses them)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = -(-T // C)
    kd, kz = _decayed(k, lg2, C, False, with_z)
    kv = _summaries(kd, v, C, v.dtype)
    del kd
    W = scan_weights(log_gamma.float(), C, N)[0]  # [H, N+1, N+1] fp32
    Wc = W[:, :, 1:].to(v.dtype).repeat(B, 1, 1)  # [B*H, N+1, N]
    states = torch.bmm(Wc, kv.view(B * H, N, K * V))
    S0 = z0 = None
    if state is not None:
        S0 = state[..., :V].reshape(B * H, 1, K * V).to(v.dtype)
        states = states + W[:, :, :1].repeat(B, 1, 1).to(v.dtype) * S0
        if with_z:
            z0 = state[..., V].reshape(B * H, 1, K).float()
    states = states.view(B * H, N + 1, K, V)
    z = None
    if with_z:
        z = torch.bmm(W[:, :, 1:].repeat(B, 1, 1), kz)
        if z0 is not None:
            z = z + W[:, :, :1].repeat(B, 1, 1) * z0
    rem = T - (N - 1) * C
    if rem == C:
        final, zf = states[:, N], (z[:, N] if with_z else None)
    else:  # partial last chunk: its summary is decayed to T-1; the state before it decays by rem
        dec = torch.exp(log_gamma.float() * rem).repeat(B).view(B * H, 1, 1)
        final = (states[:, N - 1].float() * dec + kv[:, N - 1].float()).to(v.dtype)
        zf = z[:, N - 1] * dec[..., 0] + kz[:, N - 1] if with_z else None
    final = final.view(B, H, K, V)
    if with_z:
        final = torch.cat([final, zf.view(B, H, K, 1).to(final.dtype)], dim=-1)
    return states, z, final, W


def _forward(q, k, v, log_gamma, C, state, row_sums):
    lg2 = (log_gamma.float() * LOG2E).contiguous()
    states, z, final, _ = _states(k, v, log_gamma, lg2, C, state, row_sums)
    A, s = _scores(q, k, lg2, C, z, row_sums)
    o = _out(q, states, A, v, lg2, C, trans_m=False, trans_p=False, query=True)
    return o, s, final


def _backward(q, k, v, do, log_gamma, C, state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    lg2 = (log_gamma.float() * LOG2E).contiguous()
    states, _, _, W = _states(k, v, log_gamma, lg2, C, state, False)  # recomputed, not saved
    # dS_n = (q * q_decay)^T dO over chunk n; the gradient of chunk j's summary is
    # G_j = sum_{n > j} W[n, j+1] dS_n: the scan's GEMM with W transposed.
    qd, _ = _decayed(q, lg2, C, True, False)
    dS = _summaries(qd, do, C, v.dtype)
    del qd
    WT = W[:, :N, 1:].transpose(1, 2).to(v.dtype).repeat(B, 1, 1)  # [B*H, N, N]
    G = torch.bmm(WT, dS.view(B * H, N, K * V)).view(B * H, N, K, V)
    del dS
    A, _ = _scores(q, k, lg2, C)
    dA, _ = _scores(do, v, lg2, C)
    dq = _out(do, states, dA, k, lg2, C, trans_m=True, trans_p=False, query=True)
    del states
    dk = _out(v, G, dA, q, lg2, C, trans_m=True, trans_p=True, query=False)
    dv = _out(k, G, A, do, lg2, C, trans_m=False, trans_p=True, query=False)
    return dq, dk, dv


class TritonRetention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_gamma, chunk_size, state, row_sums):
        o, s, final = _forward(q, k, v, log_gamma, chunk_size, state, row_sums)
        ctx.save_for_backward(q, k, v, log_gamma, state)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(*([s, final] if row_sums else [final]))
        return o, s, final

    @staticmethod
    def backward(ctx, do, _ds, _dfinal):
        q, k, v, log_gamma, state = ctx.saved_tensors
        if state is not None:
            state = state[..., : v.shape[-1]]
        dq, dk, dv = _backward(q, k, v, do.contiguous(), log_gamma, ctx.chunk_size, state)
        return dq, dk, dv, None, None, None, None


@torch.compiler.disable  # an opaque op to dynamo: compiled blocks get a graph break here
def triton_retention(q, k, v, log_gamma, chunk_size, state=None, row_sums=True):
    """q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V] (v's dtype, unnormalized), row sums
    s [B, T, H] fp32 or None, final state [B, H, K, V (+1)]. No document resets."""
    dtype = v.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))  # under autocast the rotation may leave q, k in fp32
    q, k, v = (t.contiguous() for t in (q, k, v))  # (no-ops in training) the kernels share q/k and v/dO strides
    if state is not None:
        state = state.detach()
    o, s, final = TritonRetention.apply(q, k, v, log_gamma.detach(), chunk_size, state, row_sums)
    return o, s, final
