"""The Triton kernels of triton_retention_gemm.py (device code and autotune configs); the host side,
the autograd Function and the design notes are there."""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_size(C: int):
    """Rows per block: the largest of 64/32/16 dividing the chunk (blocks never straddle chunks;
    on GPU the tuner may also take 128 where it divides C)."""
    for bt in (64, 32, 16):
        if C % bt == 0:
            return bt
    return None


def _configs(rows):
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
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune} if prune else None)(
        fn
    )


# ---------------------------------------------------------------------------------------------
# Decayed copy: XD[t] = d_t X[t] with d_t = gamma^(end-1-t) (keys, to the chunk's end; end =
# min(chunk end, T)) or, with QUERY, gamma^(t-start+1) (queries, for the state gradients); ZOUT:
# sum_t d_t X_t in fp32 per chunk (the row-sum state). Memory bound (one read, one write of X):
# it turns the chunk summaries into plain GEMMs whose operands come straight from memory.
# ---------------------------------------------------------------------------------------------
@triton.jit
def decay_kernel(
    X,
    XD,
    ZOUT,
    lg2_ptr,
    T,
    H,
    C: tl.constexpr,
    DX: tl.constexpr,
    sxb,
    sxt,
    sxh,
    BT: tl.constexpr,
    BX: tl.constexpr,
    QUERY: tl.constexpr,
    WITH_Z: tl.constexpr,
):
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
def _summary_kernel(
    X,
    Y,
    OUT,
    T,
    H,
    C: tl.constexpr,
    DX: tl.constexpr,
    DY: tl.constexpr,
    sxb,
    sxt,
    sxh,
    syb,
    syt,
    syh,
    BX: tl.constexpr,
    BY: tl.constexpr,
    BT: tl.constexpr,
    IEEE: tl.constexpr,
):
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
        x = tl.load(
            X + b * sxb + h * sxh + ot[:, None] * sxt + ox[None, :], mask=mt[:, None] & (ox[None, :] < DX), other=0.0
        )
        y = tl.load(
            Y + b * syb + h * syh + ot[:, None] * syt + oy[None, :], mask=mt[:, None] & (oy[None, :] < DY), other=0.0
        )
        acc += tl.dot(tl.trans(x), y, input_precision="ieee" if IEEE else "tf32")
    base = (bh * N + n) * DX * DY  # OUT: [B*H, N, DX, DY]
    tl.store(
        OUT + base + ox[:, None] * DY + oy[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=(ox[:, None] < DX) & (oy[None, :] < DY),
    )


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
def _scores_kernel(
    X,
    Y,
    P,
    RS,
    Z,
    lg2_ptr,
    T,
    H,
    C: tl.constexpr,
    E: tl.constexpr,
    sxb,
    sxt,
    sxh,
    syb,
    syt,
    syh,
    BT: tl.constexpr,
    BE: tl.constexpr,
    ROW_SUMS: tl.constexpr,
    IEEE: tl.constexpr,
):
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
            x = tl.load(
                X + b * sxb + h * sxh + oi[:, None] * sxt + oe[None, :], mask=mi[:, None] & me[None, :], other=0.0
            )
            y = tl.load(
                Y + b * syb + h * syh + oj[:, None] * syt + oe[None, :], mask=mj[:, None] & me[None, :], other=0.0
            )
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
            x = tl.load(
                X + b * sxb + h * sxh + oi[:, None] * sxt + oe[None, :], mask=mi[:, None] & me[None, :], other=0.0
            )
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
def _out_kernel(
    X,
    M,
    P,
    Y,
    OUT,
    lg2_ptr,
    T,
    H,
    C: tl.constexpr,
    E: tl.constexpr,
    D: tl.constexpr,
    sxb,
    sxt,
    sxh,
    syb,
    syt,
    syh,
    sob,
    sot,
    soh,
    m_bh,
    m_n,
    TRANS_M: tl.constexpr,
    TRANS_P: tl.constexpr,
    QUERY: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
    BS: tl.constexpr,
    IEEE: tl.constexpr,
):
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
            y = tl.load(
                Y + b * syb + h * syh + os_[:, None] * syt + od[None, :], mask=ms[:, None] & md[None, :], other=0.0
            )
            acc += tl.dot(tl.trans(pT), y, input_precision=prec)
    else:
        for s0 in range(c0, t0 + BT, BS):  # earlier rows of the chunk, to the diagonal
            os_ = s0 + tl.arange(0, BS)
            ms = os_ < T
            p = tl.load(pbase + oi[:, None] * C + (os_ - c0)[None, :], mask=mi[:, None], other=0.0)  # [BT, BS]
            y = tl.load(
                Y + b * syb + h * syh + os_[:, None] * syt + od[None, :], mask=ms[:, None] & md[None, :], other=0.0
            )
            acc += tl.dot(p, y, input_precision=prec)
    tl.store(
        OUT + b * sob + h * soh + oi[:, None] * sot + od[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=mi[:, None] & md[None, :],
    )


summary_tuned = _tuned(
    _summary_kernel,
    _configs(
        [
            ("BX", "BY", "BT", "w", "s"),
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (128, 128, 64, 4, 3),
            (128, 128, 32, 4, 4),
            (64, 128, 64, 4, 3),
            (64, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 64, 64, 4, 4),
        ]
    ),
    ["DX", "DY", "C"],
)
scores_tuned = _tuned(
    _scores_kernel,
    _configs(
        [("BT", "BE", "w", "s"), (64, 64, 4, 3), (64, 128, 4, 2), (64, 64, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)]
    ),  # (128 rows at 4 warps spills)
    ["E", "C", "ROW_SUMS"],
    _prune_bt,
)
out_tuned = _tuned(
    _out_kernel,
    _configs(
        [
            ("BT", "BD", "BE", "BS", "w", "s"),
            (128, 128, 64, 64, 8, 3),
            (128, 256, 64, 64, 8, 3),
            (128, 128, 64, 64, 4, 3),
            (128, 64, 64, 64, 4, 4),
            (64, 128, 64, 64, 4, 3),
            (64, 256, 64, 64, 8, 3),
            (64, 64, 64, 64, 4, 4),
            (128, 128, 32, 32, 8, 4),
        ]
    ),
    ["E", "D", "C", "TRANS_M", "TRANS_P"],
    _prune_bt,
)
