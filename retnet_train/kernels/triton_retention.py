"""Chunkwise retention in our own Triton kernels (backend `triton`), tuned for wide heads
(key dim 256, value dim 512) where fla's per-64-token K x V states cost more bytes than q, k, v.

Hybrid scheme (same math and state format as torch_retention._equal_full_chunks), every kernel
GEMM-shaped, with its MMA operands loaded straight from memory (pipelined; nothing is scaled or
transposed in registers before an MMA; per-token decays go on a decayed copy or the accumulator):
  * states only every C tokens (C = chunk_size, e.g. 256): a decayed copy k * k_decay (one
    memory-bound pass, _decay_kernel), then each chunk's summary (k * k_decay)^T v as a plain
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
Layout [B, T, H, D] in and out, indexed through strides (no transposing copies).
Decays are fp32, exp2 of log2(gamma) * distance with the distance masked to >= 0 first, so every
factor is <= 1 and nothing overflows. Accumulation is fp32; o, states, scores in the input dtype.

Status (H200, B1 T8192 H8 K256 V512, fwd+bwd with row sums; docs/benchmarks.md): exact (GPU test
at K256/V512 bf16 passes) but not faster than the compiled torch form: this version 3.11 ms at
C=256 (3.31 at C=128), the previous fused one 3.05, the compiled torch form 1.43-1.65. Profile of
this version: _out_kernel 32%, _summary_kernel 17%, _scores_kernel 15%, _decay_kernel 8%, i.e. the
time is spread over many passes each well below GEMM speed. It is therefore not the default.
Extra memory: the scores buffer(s), [B*H, T, C] each (one in the forward, two in the backward).

Not handled here (the dispatcher sends these to the torch path): document resets, and chunk
sizes that are not a multiple of 16. The final state carries no gradient (training never
backpropagates through it; prefill runs without grad); neither does an incoming state.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .torch_retention import scan_weights

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


def _configs(rows, key_rows="BT"):
    """Autotune configs from tuples (meta..., num_warps, num_stages)."""
    names = rows[0]
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows[1:]]


def _prune_bt(configs, nargs, **kwargs):
    """Query/key blocks never straddle a chunk: keep the configs whose BT divides C; if none (a
    small chunk), one config with the largest block that does."""
    C = nargs["C"]
    keep = [c for c in configs if C % c.kwargs["BT"] == 0]
    if keep:
        return keep
    c = configs[0]
    bt = block_size(C)
    kw = dict(c.kwargs, BT=bt, **({"BS": bt} if "BS" in c.kwargs else {}))
    return [triton.Config(kw, num_warps=4, num_stages=2)]


def _tuned(fn, configs, key, prune=None):
    """The autotuned kernel on GPU; under the CPU interpreter the first config only (autotuning
    there would run every config in slow numpy)."""
    if INTERPRET:
        return fn
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune} if prune else None)(fn)


# ---------------------------------------------------------------------------------------------
# Decayed copy: XD[t] = d_t X[t] with d_t = gamma^(end-1-t) (keys, to the chunk's end; end =
# min(chunk end, T)) or, with QUERY, gamma^(t-start+1) (queries, for the state gradients); ZOUT:
# sum_t d_t X_t in fp32 per chunk (the row-sum state). Memory bound (one read, one write of X):
# it turns the chunk summaries into plain GEMMs whose operands come straight from memory.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decay_kernel(X, XD, ZOUT, lg2_ptr, T, H, C: tl.constexpr, DX: tl.constexpr, sxb, sxt, sxh,
                  BT: tl.constexpr, BX: tl.constexpr, QUERY: tl.constexpr, WITH_Z: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, C)
    lg2 = tl.load(lg2_ptr + h)
    c0 = n * C
    end = tl.minimum(c0 + C, T)
    ox = tl.arange(0, BX)
    zacc = tl.zeros([BX], dtype=tl.float32)
    for t0 in range(c0, c0 + C, BT):
        ot = t0 + tl.arange(0, BT)
        m = (ot < end)[:, None] & (ox < DX)[None, :]
        off = b * sxb + h * sxh + ot[:, None] * sxt + ox[None, :]
        x = tl.load(X + off, mask=m, other=0.0)
        if QUERY:
            d = tl.exp2(lg2 * (ot - c0 + 1).to(tl.float32))
        else:
            d = tl.exp2(lg2 * tl.maximum(end - 1 - ot, 0).to(tl.float32))
        xd = x.to(tl.float32) * d[:, None]
        if WITH_Z:
            zacc += tl.sum(xd, 0)
        tl.store(XD + off, xd.to(XD.dtype.element_ty), mask=m)
    if WITH_Z:
        tl.store(ZOUT + (bh * N + n) * DX + ox, zacc, mask=ox < DX)


# ---------------------------------------------------------------------------------------------
# Chunk summaries, a plain batched GEMM: OUT[b, h, n] = XD_chunk^T Y_chunk ([DX, DY], reduction
# over the chunk's C tokens, rows >= T masked). Per (b, h, n): 2 C DX DY FLOPs over
# C (DX + DY) + DX DY elements (~100 FLOP/byte at C=256, K=256, V=512), so a 128 x 128..256
# output tile per program with the token loop pipelined (operands straight from memory: the
# decay is already in XD, so nothing passes through registers before the MMA).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _summary_kernel(X, Y, OUT, T, H, C: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr,
                    sxb, sxt, sxh, syb, syt, syh,
                    BX: tl.constexpr, BY: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr):
    pid_xy, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    n_y = tl.cdiv(DY, BY)
    px, py = pid_xy // n_y, pid_xy % n_y
    N = tl.cdiv(T, C)
    c0 = n * C
    end = tl.minimum(c0 + C, T)
    ox = px * BX + tl.arange(0, BX)
    oy = py * BY + tl.arange(0, BY)
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    for t0 in range(c0, c0 + C, BT):  # (to c0 + C, masked: loop bounds must not depend on T)
        ot = t0 + tl.arange(0, BT)
        mt = ot < end
        x = tl.load(X + b * sxb + h * sxh + ot[:, None] * sxt + ox[None, :], mask=mt[:, None] & (ox[None, :] < DX), other=0.0)
        y = tl.load(Y + b * syb + h * syh + ot[:, None] * syt + oy[None, :], mask=mt[:, None] & (oy[None, :] < DY), other=0.0)
        acc += tl.dot(tl.trans(x), y, input_precision="ieee" if IEEE else "tf32")
    base = (bh * N + n) * DX * DY  # OUT: [B*H, N, DX, DY]
    tl.store(OUT + base + ox[:, None] * DY + oy[None, :], acc.to(OUT.dtype.element_ty), mask=(ox[:, None] < DX) & (oy[None, :] < DY))


# ---------------------------------------------------------------------------------------------
# Intra-chunk scores: P[b, h, t, s - c0] = gamma^(t-s) (X_t . Y_s) for s <= t in t's chunk, 0
# for s > t (every entry of the chunk's row is written, so the consumers need no masks and may
# block differently). Forward: X, Y = q, k (+ row sums s_t = sum_s P_ts + gamma^(t-c0+1) q_t . z_n
# in fp32 from the unrounded scores); backward: A from q, k and dA from dO, v.
# Per query block: the causal key blocks (C/BT + 1)/2 on average, each a [BT, BT] tile with an
# E-deep reduction (E = 256 or 512): 2 BT^2 E FLOPs on 2 BT E elements (x tile stays in L2).
# The scores are stored once in the input dtype (the old fused forward recomputed q k^T once per
# V tile) and consumed by _out_kernel as a plain GEMM operand.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scores_kernel(X, Y, P, RS, Z, lg2_ptr, T, H, C: tl.constexpr, E: tl.constexpr,
                   sxb, sxt, sxh, syb, syt, syh,
                   BT: tl.constexpr, BE: tl.constexpr, ROW_SUMS: tl.constexpr, IEEE: tl.constexpr):
    pid_t, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, C)
    lg2 = tl.load(lg2_ptr + h)
    t0 = pid_t * BT
    n = t0 // C
    c0 = n * C
    oi = t0 + tl.arange(0, BT)
    mi = oi < T
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    prow = P + (bh * T + oi[:, None]) * C  # P: [B*H, T, C]
    rs = tl.zeros([BT], dtype=tl.float32)
    for j0 in range(c0, t0 + BT, BT):  # key blocks of this chunk up to the diagonal
        oj = j0 + tl.arange(0, BT)
        mj = oj < T
        acc = tl.zeros([BT, BT], dtype=tl.float32)
        for e0 in range(0, E, BE):
            oe = e0 + tl.arange(0, BE)
            me = oe < E
            x = tl.load(X + b * sxb + h * sxh + oi[:, None] * sxt + oe[None, :], mask=mi[:, None] & me[None, :], other=0.0)
            y = tl.load(Y + b * syb + h * syh + oj[:, None] * syt + oe[None, :], mask=mj[:, None] & me[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(y), input_precision=prec)
        dist = oi[:, None] - oj[None, :]
        decay = tl.where((dist >= 0) & mj[None, :], tl.exp2(lg2 * tl.maximum(dist, 0).to(tl.float32)), 0.0)
        scores = acc * decay
        if ROW_SUMS:
            rs += tl.sum(scores, 1)
        tl.store(prow + (oj - c0)[None, :], scores.to(P.dtype.element_ty), mask=mi[:, None])
    zero = tl.zeros([BT, BT], dtype=P.dtype.element_ty)
    for j0 in range(t0 + BT, c0 + C, BT):  # above the diagonal: zeros
        tl.store(prow + (j0 - c0 + tl.arange(0, BT))[None, :], zero, mask=mi[:, None])
    if ROW_SUMS:  # + the chunk's incoming row-sum state: gamma^(t-c0+1) q_t . z_n
        inter = tl.zeros([BT], dtype=tl.float32)
        for e0 in range(0, E, BE):
            oe = e0 + tl.arange(0, BE)
            me = oe < E
            x = tl.load(X + b * sxb + h * sxh + oi[:, None] * sxt + oe[None, :], mask=mi[:, None] & me[None, :], other=0.0)
            z = tl.load(Z + (bh * (N + 1) + n) * E + oe, mask=me, other=0.0)
            inter += tl.sum(x.to(tl.float32) * z[None, :], 1)
        rs += inter * tl.exp2(lg2 * (oi - c0 + 1).to(tl.float32))
        tl.store(RS + (b * T + oi) * H + h, rs, mask=mi)  # s [B, T, H] fp32


# ---------------------------------------------------------------------------------------------
# One GEMM-shaped kernel for o, dq, dk and dv (rows t of one chunk n, a BD-wide column tile):
#   OUT[t] = dec_t * (X_t @ M_n)  +  sum_s P'[t, s] Y_s
# where dec_t = gamma^(t-c0+1) (QUERY side) or gamma^(end-1-t) (key side), M_n a per-chunk
# [E, D] matrix (or, TRANS_M, stored [D, E]) and P' = P (s <= t) or, TRANS_P, P^T (s >= t).
#   o  = qd (q S_n)        + A v         (E = K, D = V)
#   dq = qd (dO S_n^T)     + dA k        (E = V, D = K)
#   dk = kd (v G_n^T)      + dA^T q      (E = V, D = K)
#   dv = kd (k G_n)        + A^T dO      (E = K, D = V)
# The row decay is applied to the accumulator between the two reductions, so every MMA operand
# is loaded straight from memory (pipelined; no register-side scaling or transposes): an
# (E + causal C)-deep reduction (8 iterations of 64 on average at E = 256, C = 256) for a
# [BT, BD] tile. 128 x 128..256 tiles read each state tile C/128 times per chunk instead of C/64.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _out_kernel(X, M, P, Y, OUT, lg2_ptr, T, H, C: tl.constexpr, E: tl.constexpr, D: tl.constexpr,
                sxb, sxt, sxh, syb, syt, syh, sob, sot, soh, m_bh, m_n,
                TRANS_M: tl.constexpr, TRANS_P: tl.constexpr, QUERY: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr):
    pid_t, pid_d, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    lg2 = tl.load(lg2_ptr + h)
    t0 = pid_t * BT
    n = t0 // C
    c0 = n * C
    end = tl.minimum(c0 + C, T)
    oi = t0 + tl.arange(0, BT)
    od = pid_d * BD + tl.arange(0, BD)
    mi, md = oi < T, od < D
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    mbase = M + bh * m_bh + n * m_n
    for e0 in range(0, E, BE):
        oe = e0 + tl.arange(0, BE)
        me = oe < E
        x = tl.load(X + b * sxb + h * sxh + oi[:, None] * sxt + oe[None, :], mask=mi[:, None] & me[None, :], other=0.0)
        if TRANS_M:
            m = tl.load(mbase + od[None, :] * E + oe[:, None], mask=me[:, None] & md[None, :], other=0.0)
        else:
            m = tl.load(mbase + oe[:, None] * D + od[None, :], mask=me[:, None] & md[None, :], other=0.0)
        acc += tl.dot(x.to(m.dtype), m, input_precision=prec)
    if QUERY:
        dec = tl.exp2(lg2 * (oi - c0 + 1).to(tl.float32))
    else:
        dec = tl.exp2(lg2 * tl.maximum(end - 1 - oi, 0).to(tl.float32))
    acc = acc * dec[:, None]
    pbase = P + bh * T * C
    if TRANS_P:
        for s0 in range(t0, c0 + C, BS):  # later rows of the chunk (P is 0 above the diagonal)
            os_ = s0 + tl.arange(0, BS)
            ms = os_ < T
            pT = tl.load(pbase + os_[:, None] * C + (oi - c0)[None, :], mask=ms[:, None], other=0.0)  # [BS, BT]
            y = tl.load(Y + b * syb + h * syh + os_[:, None] * syt + od[None, :], mask=ms[:, None] & md[None, :], other=0.0)
            acc += tl.dot(tl.trans(pT), y, input_precision=prec)
    else:
        for s0 in range(c0, t0 + BT, BS):  # earlier rows of the chunk, to the diagonal
            os_ = s0 + tl.arange(0, BS)
            ms = os_ < T
            p = tl.load(pbase + oi[:, None] * C + (os_ - c0)[None, :], mask=mi[:, None], other=0.0)  # [BT, BS]
            y = tl.load(Y + b * syb + h * syh + os_[:, None] * syt + od[None, :], mask=ms[:, None] & md[None, :], other=0.0)
            acc += tl.dot(p, y, input_precision=prec)
    tl.store(OUT + b * sob + h * soh + oi[:, None] * sot + od[None, :], acc.to(OUT.dtype.element_ty), mask=mi[:, None] & md[None, :])


_summary_tuned = _tuned(_summary_kernel, _configs([
    ("BX", "BY", "BT", "w", "s"),
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 3), (64, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4)]), ["DX", "DY", "C"])
_scores_tuned = _tuned(_scores_kernel, _configs([
    ("BT", "BE", "w", "s"),
    (64, 64, 4, 3), (64, 128, 4, 2), (64, 64, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)]),  # (128 rows at 4 warps spills)
    ["E", "C", "ROW_SUMS"], _prune_bt)
_out_tuned = _tuned(_out_kernel, _configs([
    ("BT", "BD", "BE", "BS", "w", "s"),
    (128, 128, 64, 64, 8, 3), (128, 256, 64, 64, 8, 3), (128, 128, 64, 64, 4, 3), (128, 64, 64, 64, 4, 4),
    (64, 128, 64, 64, 4, 3), (64, 256, 64, 64, 8, 3), (64, 64, 64, 64, 4, 4), (128, 128, 32, 32, 8, 4)]),
    ["E", "D", "C", "TRANS_M", "TRANS_P"], _prune_bt)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def block_size(C: int):
    """Rows per block: the largest of 64/32/16 dividing the chunk (blocks never straddle chunks;
    on GPU the tuner may also take 128 where it divides C)."""
    for bt in (64, 32, 16):
        if C % bt == 0:
            return bt
    return None


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
    """d_t x_t (see _decay_kernel) in x's dtype and layout, + [B*H, N, DX] fp32 decayed sums."""
    B, T, H, DX = x.shape
    N = -(-T // C)
    xd = torch.empty_like(x)
    z = torch.empty(B * H, N, DX, device=x.device, dtype=torch.float32) if with_z else xd
    _decay_kernel[(N, B * H)](x, xd, z, lg2, T, H, C, DX, *_bth(x), BT=min(32, _pow2(C)), BX=_pow2(DX),
                              QUERY=query, WITH_Z=with_z, num_warps=4)
    return xd, (z if with_z else None)


def _summaries(xd, y, C, out_dtype):
    """[B*H, N, DX, DY] chunk summaries xd_chunk^T y_chunk."""
    B, T, H, DX = xd.shape
    DY = y.shape[-1]
    N = -(-T // C)
    out = torch.empty(B * H, N, DX, DY, device=xd.device, dtype=out_dtype)
    grid = lambda meta: (triton.cdiv(DX, meta["BX"]) * triton.cdiv(DY, meta["BY"]), N, B * H)  # noqa: E731
    meta = _imeta("summary", BX=min(64, _pow2(DX)), BY=min(64, _pow2(DY)), BT=block_size(C), num_warps=4)
    _summary_tuned[grid](xd, y, out, T, H, C, DX, DY, *_bth(xd), *_bth(y), IEEE=xd.dtype == torch.float32, **meta)
    return out


def _scores(x, y, lg2, C, z=None, row_sums=False):
    """P [B*H, T, C] (x_t . y_s decayed, 0 above the diagonal) in x's dtype, + row sums [B, T, H]."""
    B, T, H, E = x.shape
    P = torch.empty(B * H, T, C, device=x.device, dtype=x.dtype)
    rs = torch.empty(B, T, H, device=x.device, dtype=torch.float32) if row_sums else P
    grid = lambda meta: (triton.cdiv(T, meta["BT"]), B * H)  # noqa: E731
    meta = _imeta("scores", BT=block_size(C), BE=min(32, _pow2(E)), num_warps=4)
    _scores_tuned[grid](x, y, P, rs, z if row_sums else P, lg2, T, H, C, E, *_bth(x), *_bth(y),
                        ROW_SUMS=row_sums, IEEE=x.dtype == torch.float32, **meta)
    return P, (rs if row_sums else None)


def _out(x, M, P, y, lg2, C, trans_m, trans_p, query):
    """x [B,T,H,E], M [B*H, N(+1), ...] per-chunk matrices, P [B*H, T, C], y [B,T,H,D] -> [B,T,H,D]."""
    B, T, H, E = x.shape
    D = y.shape[-1]
    out = torch.empty_like(y)
    grid = lambda meta: (triton.cdiv(T, meta["BT"]), triton.cdiv(D, meta["BD"]), B * H)  # noqa: E731
    bt = block_size(C)
    meta = _imeta("out", BT=bt, BD=min(64, _pow2(D)), BE=min(32, _pow2(E)), BS=min(bt, 32), num_warps=4)
    _out_tuned[grid](x, M, P, y, out, lg2, T, H, C, E, D, *_bth(x), *_bth(y), *_bth(out), M.stride(0), M.stride(1),
                     TRANS_M=trans_m, TRANS_P=trans_p, QUERY=query, IEEE=x.dtype == torch.float32, **meta)
    return out


def _states(k, v, log_gamma, lg2, C, state, with_z):
    """States entering each chunk, [B*H, N+1, K, V] in v's dtype (index N: after the last full
    chunk), the matching row-sum states z [B*H, N+1, K] fp32, and the final state."""
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
    return states, z, final


def _forward(q, k, v, log_gamma, C, state, row_sums):
    lg2 = (log_gamma.float() * LOG2E).contiguous()
    states, z, final = _states(k, v, log_gamma, lg2, C, state, row_sums)
    A, s = _scores(q, k, lg2, C, z, row_sums)
    o = _out(q, states, A, v, lg2, C, trans_m=False, trans_p=False, query=True)
    return o, s, final


def _backward(q, k, v, do, log_gamma, C, state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    lg2 = (log_gamma.float() * LOG2E).contiguous()
    states, _, _ = _states(k, v, log_gamma, lg2, C, state, False)  # recomputed, not saved
    # dS_n = (q * q_decay)^T dO over chunk n; the gradient of chunk j's summary is
    # G_j = sum_{n > j} W[n, j+1] dS_n: the scan's GEMM with W transposed.
    qd, _ = _decayed(q, lg2, C, True, False)
    dS = _summaries(qd, do, C, v.dtype)
    del qd
    W = scan_weights(log_gamma.float(), C, N)[0]
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
