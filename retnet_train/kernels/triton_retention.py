"""Chunkwise retention in our own Triton kernels (backend `triton`), tuned for wide heads
(key dim 256, value dim 512) where fla's per-64-token K x V states cost more bytes than q, k, v.

Hybrid scheme (same math and state format as torch_retention._equal_full_chunks):
  * states only every C tokens (C = chunk_size, e.g. 256): a Triton kernel writes each chunk's
    summary (k * k_decay)^T v, and the cross-chunk scan is one torch GEMM with the (N+1) x N decay
    matrix from scan_weights (big cuBLAS GEMMs; nothing sequential);
  * the intra-chunk part (q k^T * decay) v runs in Triton over BT x BT blocks of the chunk's lower
    triangle only (half the FLOPs of a dense masked GEMM), fused with the state read
    (q * q_decay) S_n and, for the paper's normalization, the score row sums (fp32, no gradient);
  * backward: dq in one kernel (per query block), dk and dv in two (per key block), the state
    gradients dS_n = (q * q_decay)^T dO per chunk by the same summary kernel and a transposed scan
    GEMM. Only q, k, v are saved; the states are recomputed (one kernel + one GEMM), so the
    backward keeps no T/C x K x V tensors between the passes.
Layout [B, T, H, D] in and out, indexed through strides (no transposing copies).
Decays are fp32, exp2 of log2(gamma) * distance with the distance masked to >= 0 first, so every
factor is <= 1 and nothing overflows. Accumulation is fp32; o, states in the input dtype.

Status (H200, B1 T8192 H8 K256 V512, fwd+bwd): 3.05 ms at C=256 vs 1.65 ms for the compiled torch
form; the kernels run at ~50-80 TFLOP/s and need tile tuning (see docs/benchmarks.md).

Not handled here (the dispatcher sends these to the torch path): document resets, and chunk
sizes that are not a multiple of 16. The final state carries no gradient (training never
backpropagates through it; prefill runs without grad); neither does an incoming state.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .torch_retention import scan_weights

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


def _configs(bvs, warps_stages):
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in bvs for w, s in warps_stages]


def _tuned(fn, configs, key):
    """The autotuned kernel on GPU; under the CPU interpreter the first config only (autotuning
    there would run every config in slow numpy)."""
    return fn if INTERPRET else triton.autotune(configs=configs, key=key)(fn)


# ---------------------------------------------------------------------------------------------
# Chunk summaries: OUT[b, h, n] = sum_{t in chunk n} d_t X_t^T Y_t, where d_t = gamma^(end-1-t)
# (keys decayed to the chunk's end; end = min(chunk end, T) so a partial last chunk works) or,
# with QUERY, d_t = gamma^(t-start+1) (state gradients). ZOUT: sum_t d_t X_t (row-sum state).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _summary_kernel(X, Y, OUT, ZOUT, lg2_ptr, T, H, C: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr,
                    sxb, sxt, sxh, syb, syt, syh,
                    BX: tl.constexpr, BY: tl.constexpr, BT: tl.constexpr,
                    QUERY: tl.constexpr, WITH_Z: tl.constexpr, IEEE: tl.constexpr):
    pid_xy, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    n_y = tl.cdiv(DY, BY)
    px, py = pid_xy // n_y, pid_xy % n_y
    N = tl.cdiv(T, C)
    lg2 = tl.load(lg2_ptr + h)
    c0 = n * C
    end = tl.minimum(c0 + C, T)
    ox = px * BX + tl.arange(0, BX)
    oy = py * BY + tl.arange(0, BY)
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    zacc = tl.zeros([BX], dtype=tl.float32)
    for t0 in range(c0, c0 + C, BT):  # (to c0 + C, masked: loop bounds must not depend on T)
        ot = t0 + tl.arange(0, BT)
        mt = ot < end
        x = tl.load(X + b * sxb + h * sxh + ot[:, None] * sxt + ox[None, :], mask=mt[:, None] & (ox[None, :] < DX), other=0.0)
        y = tl.load(Y + b * syb + h * syh + ot[:, None] * syt + oy[None, :], mask=mt[:, None] & (oy[None, :] < DY), other=0.0)
        if QUERY:
            d = tl.exp2(lg2 * (ot - c0 + 1).to(tl.float32))
        else:
            d = tl.exp2(lg2 * tl.maximum(end - 1 - ot, 0).to(tl.float32))
        xd = x.to(tl.float32) * d[:, None]
        if WITH_Z:
            zacc += tl.sum(xd, 0)
        acc += tl.dot(tl.trans(xd.to(x.dtype)), y, input_precision="ieee" if IEEE else "tf32")
    base = (bh * N + n) * DX * DY  # OUT: [B*H, N, DX, DY]
    tl.store(OUT + base + ox[:, None] * DY + oy[None, :], acc.to(OUT.dtype.element_ty), mask=(ox[:, None] < DX) & (oy[None, :] < DY))
    if WITH_Z:
        tl.store(ZOUT + (bh * N + n) * DX + ox, zacc, mask=(ox < DX) & (py == 0))


# ---------------------------------------------------------------------------------------------
# Forward: o[i] = sum_{j <= i, same chunk} gamma^(i-j) (q_i . k_j) v_j + (q_i gamma^(i-c0+1)) S_n
# per (query block of BT rows, V tile); row sums s from the same scores (+ q_i gamma^.. . z_n).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(Q, K_, V_, S, Z, O, RS, lg2_ptr, T, H, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                sqb, sqt, sqh, svb, svt, svh, sob, sot, soh,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                ROW_SUMS: tl.constexpr, IEEE: tl.constexpr):
    pid_t, pid_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, C)
    lg2 = tl.load(lg2_ptr + h)
    t0 = pid_t * BT
    n = t0 // C
    c0 = n * C
    oi = t0 + tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = pid_v * BV + tl.arange(0, BV)
    mi, mk, mv = oi < T, ok < DK, ov < DV
    q = tl.load(Q + b * sqb + h * sqh + oi[:, None] * sqt + ok[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    rs = tl.zeros([BT], dtype=tl.float32)
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    for j0 in range(c0, t0 + BT, BT):  # key blocks of this chunk up to the diagonal
        oj = j0 + tl.arange(0, BT)
        mj = oj < T
        k = tl.load(K_ + b * sqb + h * sqh + oj[:, None] * sqt + ok[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
        v = tl.load(V_ + b * svb + h * svh + oj[:, None] * svt + ov[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
        dist = oi[:, None] - oj[None, :]
        causal = (dist >= 0) & mj[None, :]
        decay = tl.where(causal, tl.exp2(lg2 * tl.maximum(dist, 0).to(tl.float32)), 0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=prec) * decay
        if ROW_SUMS:
            rs += tl.sum(scores, 1)
        acc += tl.dot(scores.to(v.dtype), v, input_precision=prec)
    # the chunk's incoming state S_n [DK, DV] (states: [B*H, N+1, DK, DV])
    qd = q.to(tl.float32) * tl.exp2(lg2 * (oi - c0 + 1).to(tl.float32))[:, None]
    sbase = (bh * (N + 1) + n) * DK * DV
    st = tl.load(S + sbase + ok[:, None] * DV + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    acc += tl.dot(qd.to(st.dtype), st, input_precision=prec)
    tl.store(O + b * sob + h * soh + oi[:, None] * sot + ov[None, :], acc.to(O.dtype.element_ty), mask=mi[:, None] & mv[None, :])
    if ROW_SUMS:
        z = tl.load(Z + (bh * (N + 1) + n) * DK + ok, mask=mk, other=0.0)
        rs += tl.sum(qd * z[None, :], 1)
        tl.store(RS + (b * T + oi) * H + h, rs, mask=mi & (pid_v == 0))  # s [B, T, H] fp32


_fwd_tuned = _tuned(_fwd_kernel, _configs([64, 128, 256], [(4, 2), (8, 2), (8, 3)]), ["DK", "DV", "BT"])


# ---------------------------------------------------------------------------------------------
# dq[i] = sum_{j <= i} gamma^(i-j) (dO_i . v_j) k_j + gamma^(i-c0+1) dO_i S_n^T   (full K per block)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dq_kernel(DO, K_, V_, S, DQ, lg2_ptr, T, H, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               sqb, sqt, sqh, svb, svt, svh,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    pid_t, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, C)
    lg2 = tl.load(lg2_ptr + h)
    t0 = pid_t * BT
    n = t0 // C
    c0 = n * C
    oi = t0 + tl.arange(0, BT)
    ok = tl.arange(0, BK)
    mi, mk = oi < T, ok < DK
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    for j0 in range(c0, t0 + BT, BT):
        oj = j0 + tl.arange(0, BT)
        mj = oj < T
        dA = tl.zeros([BT, BT], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            ov = v0 + tl.arange(0, BV)
            mv = ov < DV
            do = tl.load(DO + b * svb + h * svh + oi[:, None] * svt + ov[None, :], mask=mi[:, None] & mv[None, :], other=0.0)
            v = tl.load(V_ + b * svb + h * svh + oj[:, None] * svt + ov[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
            dA += tl.dot(do, tl.trans(v), input_precision=prec)
        dist = oi[:, None] - oj[None, :]
        decay = tl.where((dist >= 0) & mj[None, :], tl.exp2(lg2 * tl.maximum(dist, 0).to(tl.float32)), 0.0)
        k = tl.load(K_ + b * sqb + h * sqh + oj[:, None] * sqt + ok[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
        acc += tl.dot((dA * decay).to(k.dtype), k, input_precision=prec)
    # inter-chunk: dO_i S_n^T, the state tile read transposed [BV, BK]
    inter = tl.zeros([BT, BK], dtype=tl.float32)
    sbase = (bh * (N + 1) + n) * DK * DV
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < DV
        do = tl.load(DO + b * svb + h * svh + oi[:, None] * svt + ov[None, :], mask=mi[:, None] & mv[None, :], other=0.0)
        stT = tl.load(S + sbase + ok[None, :] * DV + ov[:, None], mask=mk[None, :] & mv[:, None], other=0.0)
        inter += tl.dot(do.to(stT.dtype), stT, input_precision=prec)
    acc += inter * tl.exp2(lg2 * (oi - c0 + 1).to(tl.float32))[:, None]
    tl.store(DQ + b * sqb + h * sqh + oi[:, None] * sqt + ok[None, :], acc.to(DQ.dtype.element_ty), mask=mi[:, None] & mk[None, :])


# ---------------------------------------------------------------------------------------------
# dk[j] = sum_{i >= j, same chunk} gamma^(i-j) (dO_i . v_j) q_i + gamma^(end-1-j) v_j G_n^T
# G_n = gradient of chunk n's summary (the decayed dS of all later chunks; [B*H, N, DK, DV]).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dk_kernel(Q, DO, V_, G, DKo, lg2_ptr, T, H, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               sqb, sqt, sqh, svb, svt, svh,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    pid_t, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, C)
    lg2 = tl.load(lg2_ptr + h)
    j0 = pid_t * BT
    n = j0 // C
    c0 = n * C
    end = tl.minimum(c0 + C, T)
    oj = j0 + tl.arange(0, BT)
    ok = tl.arange(0, BK)
    mj, mk = oj < T, ok < DK
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    for i0 in range(j0, c0 + C, BT):  # query blocks from the diagonal to the chunk's end (masked past T)
        oi = i0 + tl.arange(0, BT)
        mi = oi < T
        dAT = tl.zeros([BT, BT], dtype=tl.float32)  # [j, i]
        for v0 in range(0, DV, BV):
            ov = v0 + tl.arange(0, BV)
            mv = ov < DV
            v = tl.load(V_ + b * svb + h * svh + oj[:, None] * svt + ov[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
            do = tl.load(DO + b * svb + h * svh + oi[:, None] * svt + ov[None, :], mask=mi[:, None] & mv[None, :], other=0.0)
            dAT += tl.dot(v, tl.trans(do), input_precision=prec)
        dist = oi[None, :] - oj[:, None]
        decay = tl.where((dist >= 0) & mi[None, :], tl.exp2(lg2 * tl.maximum(dist, 0).to(tl.float32)), 0.0)
        q = tl.load(Q + b * sqb + h * sqh + oi[:, None] * sqt + ok[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
        acc += tl.dot((dAT * decay).to(q.dtype), q, input_precision=prec)
    inter = tl.zeros([BT, BK], dtype=tl.float32)
    gbase = (bh * N + n) * DK * DV
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < DV
        v = tl.load(V_ + b * svb + h * svh + oj[:, None] * svt + ov[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
        gT = tl.load(G + gbase + ok[None, :] * DV + ov[:, None], mask=mk[None, :] & mv[:, None], other=0.0)
        inter += tl.dot(v.to(gT.dtype), gT, input_precision=prec)
    acc += inter * tl.exp2(lg2 * tl.maximum(end - 1 - oj, 0).to(tl.float32))[:, None]
    tl.store(DKo + b * sqb + h * sqh + oj[:, None] * sqt + ok[None, :], acc.to(DKo.dtype.element_ty), mask=mj[:, None] & mk[None, :])


# ---------------------------------------------------------------------------------------------
# dv[j] = sum_{i >= j, same chunk} gamma^(i-j) (q_i . k_j) dO_i + gamma^(end-1-j) k_j G_n  (V tiles)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dv_kernel(Q, K_, DO, G, DVo, lg2_ptr, T, H, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               sqb, sqt, sqh, svb, svt, svh,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    pid_t, pid_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, C)
    lg2 = tl.load(lg2_ptr + h)
    j0 = pid_t * BT
    n = j0 // C
    c0 = n * C
    end = tl.minimum(c0 + C, T)
    oj = j0 + tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = pid_v * BV + tl.arange(0, BV)
    mj, mk, mv = oj < T, ok < DK, ov < DV
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    k = tl.load(K_ + b * sqb + h * sqh + oj[:, None] * sqt + ok[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i0 in range(j0, c0 + C, BT):
        oi = i0 + tl.arange(0, BT)
        mi = oi < T
        q = tl.load(Q + b * sqb + h * sqh + oi[:, None] * sqt + ok[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
        do = tl.load(DO + b * svb + h * svh + oi[:, None] * svt + ov[None, :], mask=mi[:, None] & mv[None, :], other=0.0)
        dist = oi[None, :] - oj[:, None]
        decay = tl.where((dist >= 0) & mi[None, :], tl.exp2(lg2 * tl.maximum(dist, 0).to(tl.float32)), 0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=prec) * decay  # [j, i]
        acc += tl.dot(sT.to(do.dtype), do, input_precision=prec)
    gbase = (bh * N + n) * DK * DV
    g = tl.load(G + gbase + ok[:, None] * DV + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    kd = k.to(tl.float32) * tl.exp2(lg2 * tl.maximum(end - 1 - oj, 0).to(tl.float32))[:, None]
    acc += tl.dot(kd.to(g.dtype), g, input_precision=prec)
    tl.store(DVo + b * svb + h * svh + oj[:, None] * svt + ov[None, :], acc.to(DVo.dtype.element_ty), mask=mj[:, None] & mv[None, :])


_dv_tuned = _tuned(_dv_kernel, _configs([64, 128, 256], [(4, 2), (8, 2), (8, 3)]), ["DK", "DV", "BT"])
_dq_tuned = _tuned(_dq_kernel, _configs([32, 64, 128], [(4, 2), (8, 2), (8, 3)]), ["DK", "DV", "BT"])
_dk_tuned = _tuned(_dk_kernel, _configs([32, 64, 128], [(4, 2), (8, 2), (8, 3)]), ["DK", "DV", "BT"])
_summary_tuned = _tuned(_summary_kernel, [triton.Config({"BX": bx, "BY": by, "BT": bt}, num_warps=w, num_stages=st)
                                          for bx, by, bt, w, st in [(128, 128, 64, 8, 2), (128, 128, 64, 8, 3), (128, 128, 128, 8, 2),
                                                                    (64, 128, 64, 4, 3), (128, 256, 64, 8, 2), (64, 256, 64, 8, 3)]],
                        ["DX", "DY", "C"])


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def block_size(C: int):
    """Rows per block: the largest of 64/32/16 dividing the chunk (blocks never straddle chunks)."""
    for bt in (64, 32, 16):
        if C % bt == 0:
            return bt
    return None


def _pow2(x):
    return max(16, triton.next_power_of_2(x))


def _inner_bv(DV):
    return 64 if DV >= 64 else _pow2(DV)


def _summaries(x, y, lg2, C, out_dtype, query, with_z):
    """[B*H, N, DX, DY] chunk summaries (+ [B*H, N, DX] fp32 decayed row sums of x)."""
    B, T, H, DX = x.shape
    DY = y.shape[-1]
    N = -(-T // C)
    out = torch.empty(B * H, N, DX, DY, device=x.device, dtype=out_dtype)
    z = torch.empty(B * H, N, DX, device=x.device, dtype=torch.float32) if with_z else out
    grid = lambda meta: (triton.cdiv(DX, meta["BX"]) * triton.cdiv(DY, meta["BY"]), N, B * H)  # noqa: E731
    meta = {"BX": min(128, _pow2(DX)), "BY": min(128, _pow2(DY)), "BT": block_size(C), "num_warps": 4} if INTERPRET else {}
    _summary_tuned[grid](x, y, out, z, lg2, T, H, C, DX, DY, *_bth(x), *_bth(y),
                         QUERY=query, WITH_Z=with_z, IEEE=x.dtype == torch.float32, **meta)
    return out, (z if with_z else None)


def _bth(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _states(k, v, log_gamma, lg2, C, state, with_z):
    """States entering each chunk, [B*H, N+1, K, V] in v's dtype (index N: after the last full
    chunk), the matching row-sum states z [B*H, N+1, K] fp32, and the final state."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = -(-T // C)
    kv, kz = _summaries(k, v, lg2, C, v.dtype, False, with_z)
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
    return states, z, final


def _forward(q, k, v, log_gamma, C, state, row_sums):
    B, T, H, K = q.shape
    V = v.shape[-1]
    lg2 = (log_gamma.float() * LOG2E).contiguous()
    states, z, final = _states(k, v, log_gamma, lg2, C, state, row_sums)
    o = torch.empty_like(v)
    s = torch.empty(B, T, H, device=q.device, dtype=torch.float32) if row_sums else None
    BT = block_size(C)
    grid = lambda meta: (triton.cdiv(T, BT), triton.cdiv(V, meta["BV"]), B * H)  # noqa: E731
    meta = {"BV": min(64, _pow2(V)), "num_warps": 4} if INTERPRET else {}
    _fwd_tuned[grid](q, k, v, states, z if row_sums else states, o, s if row_sums else o, lg2, T, H, C, K, V,
                     *_bth(q), *_bth(v), *_bth(o), BT=BT, BK=_pow2(K), ROW_SUMS=row_sums,
                     IEEE=q.dtype == torch.float32, **meta)
    return o, s, final


def _backward(q, k, v, do, log_gamma, C, state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    lg2 = (log_gamma.float() * LOG2E).contiguous()
    states, _, _ = _states(k, v, log_gamma, lg2, C, state, False)  # recomputed, not saved
    # dS_n = (q * q_decay)^T dO over chunk n; the gradient of chunk j's summary is
    # G_j = sum_{n > j} W[n, j+1] dS_n: the scan's GEMM with W transposed.
    dS, _ = _summaries(q, do, lg2, C, v.dtype, True, False)
    W = scan_weights(log_gamma.float(), C, N)[0]
    WT = W[:, :N, 1:].transpose(1, 2).to(v.dtype).repeat(B, 1, 1)  # [B*H, N, N]
    G = torch.bmm(WT, dS.view(B * H, N, K * V)).view(B * H, N, K, V)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    BT, BK = block_size(C), _pow2(K)
    ieee = q.dtype == torch.float32
    meta = {"BV": _inner_bv(V), "num_warps": 4} if INTERPRET else {}
    _dq_tuned[(triton.cdiv(T, BT), B * H)](do, k, v, states, dq, lg2, T, H, C, K, V, *_bth(q), *_bth(v),
                                           BT=BT, BK=BK, IEEE=ieee, **meta)
    _dk_tuned[(triton.cdiv(T, BT), B * H)](q, do, v, G, dk, lg2, T, H, C, K, V, *_bth(q), *_bth(v),
                                           BT=BT, BK=BK, IEEE=ieee, **meta)
    grid = lambda meta: (triton.cdiv(T, BT), triton.cdiv(V, meta["BV"]), B * H)  # noqa: E731
    meta = {"BV": min(64, _pow2(V)), "num_warps": 4} if INTERPRET else {}
    _dv_tuned[grid](q, k, do, G, dv, lg2, T, H, C, K, V, *_bth(q), *_bth(v), BT=BT, BK=BK, IEEE=ieee, **meta)
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
