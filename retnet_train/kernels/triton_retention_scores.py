"""The intra-chunk scores of triton_retention.py: `_scores_kernel` writes, once per direction, the
decayed causal scores that every output pass of the chunk reads (Triton device code; autotune
configs and launching in triton_retention_launch.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# A[t, c - c0] = gamma^(t-c) (X_t . B_c) for the columns c <= t of t's chunk n (c0 its first) in
# t's document, 0 for the chunk's other columns: [B*H, T, C] in the input dtype, one program per
# [BR, BC] block of a chunk (blocks past the diagonal write zeros). The output passes read A (query
# rows) or its transpose (key rows) instead of recomputing it for every output column tile.
# Blocks wholly before the diagonal split the decay at the row block's edge (both factors <= 1);
# blocks on it take an elementwise exp2 of the (clamped) distance.
# ROW_SUMS (forward): also each block's row sums of the unrounded scores, fp32, into RS [B, T, H,
# C / 16] (zeroed, the slot of the block's first 16 columns; summed by the caller), the chunk's
# first block adding gamma^(t-c0+1) X_t . z_n (the row-sum state z_n [B*H, N, E] fp32).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scores_kernel(
    X,
    B,
    A,
    RS,
    Z,
    DOC,
    lg2_ptr,
    T,
    H,
    C,
    N,
    sxb,
    sxt,
    sxh,
    sbb,
    sbt,
    sbh,
    E: tl.constexpr,
    ROW_SUMS: tl.constexpr,
    RESET: tl.constexpr,
    IEEE: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    BE: tl.constexpr,
):
    tl.static_assert(BR % BC == 0, "column blocks must tile a row block")
    pid_r, pid_c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b, h = bh // H, bh % H
    lg2 = tl.load(lg2_ptr + h)
    r0 = pid_r * BR
    n = r0 // C
    c0 = n * C
    j0 = c0 + pid_c * BC
    ar = tl.arange(0, BR)
    ac = tl.arange(0, BC)
    orr = r0 + ar
    oc = j0 + ac
    mr = orr < T
    x_rows = X + b * sxb + h * sxh + orr[:, None].to(tl.int64) * sxt
    a_tile = A + (bh * T + orr[:, None]) * C - c0 + oc[None, :]
    if RESET:
        drow = tl.load(DOC + b * T + orr, mask=mr, other=0)  # the row's document start
    rs = tl.zeros([BR], dtype=tl.float32)
    if j0 >= r0 + BR:  # past the diagonal: zeros, read by the output passes, never used
        tl.store(a_tile, tl.zeros([BR, BC], dtype=A.dtype.element_ty), mask=mr[:, None])
    else:
        p = tl.zeros([BR, BC], dtype=tl.float32)
        bb = B + b * sbb + h * sbh + oc[:, None].to(tl.int64) * sbt
        mc = oc < T
        for e0 in range(0, E, BE):
            oe = e0 + tl.arange(0, BE)
            x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
            kc = tl.load(bb + oe[None, :], mask=mc[:, None], other=0.0)
            p = tl.dot(x, tl.trans(kc), p, input_precision="ieee" if IEEE else "tf32")
        if j0 + BC <= r0:
            p = p * tl.exp2(lg2 * ar.to(tl.float32))[:, None] * tl.exp2(lg2 * (r0 - oc).to(tl.float32))[None, :]
        else:
            p = p * tl.exp2(lg2 * tl.maximum(orr[:, None] - oc[None, :], 0).to(tl.float32))
            p = tl.where(orr[:, None] >= oc[None, :], p, 0.0)
        if RESET:
            p = tl.where(oc[None, :] >= drow[:, None], p, 0.0)
        rs = tl.sum(p, 1)
        tl.store(a_tile, p.to(A.dtype.element_ty), mask=mr[:, None])

    if ROW_SUMS:
        if pid_c == 0:
            zq = tl.zeros([BR], dtype=tl.float32)
            for e0 in range(0, E, BE):
                oe = e0 + tl.arange(0, BE)
                x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
                zq += tl.sum(x.to(tl.float32) * tl.load(Z + (bh * N + n) * E + oe)[None, :], 1)
            rdec = tl.exp2(lg2 * (orr - c0 + 1).to(tl.float32))
            if RESET:
                rdec = tl.where(drow < c0, rdec, 0.0)
            rs += zq * rdec
        tl.store(RS + ((b * T + orr) * H + h) * (C // 16) + pid_c * BC // 16, rs, mask=mr)
