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
# BR-row block of a chunk. The output passes read A (query rows) or its transpose (key rows) instead
# of recomputing it for every output column tile.
# The diagonal [BR, BR] block's decay is an outer product of two vectors centred on it (factors <=
# gamma^(-BR/2)) unless gamma^(BR/2) would underflow, then an elementwise exp2; the other blocks'
# decays split at the row block's edge (both factors <= 1).
# ROW_SUMS (forward): also s_t = sum_c A_tc + gamma^(t-c0+1) X_t . z_n in fp32 from the unrounded
# scores (the row-sum state z_n [B*H, N, E] fp32), into RS [B, T, H].
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
    pid_r, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    lg2 = tl.load(lg2_ptr + h)
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    r0 = pid_r * BR
    n = r0 // C
    c0 = n * C
    ar = tl.arange(0, BR)
    orr = r0 + ar
    mr = orr < T
    x_rows = X + b * sxb + h * sxh + orr[:, None].to(tl.int64) * sxt
    bb = B + b * sbb + h * sbh
    a_rows = A + (bh * T + orr[:, None]) * C - c0
    drow = orr
    if RESET:
        drow = tl.load(DOC + b * T + orr, mask=mr, other=0)

    # The diagonal block (rows and columns at the same positions).
    p = tl.zeros([BR, BR], dtype=tl.float32)
    for e0 in range(0, E, BE):
        oe = e0 + tl.arange(0, BE)
        x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
        kb = tl.load(bb + orr[:, None].to(tl.int64) * sbt + oe[None, :], mask=mr[:, None], other=0.0)
        p = tl.dot(x, tl.trans(kb), p, input_precision=prec)
    keep = ar[:, None] >= ar[None, :]
    if RESET:
        keep = keep & (orr[None, :] >= drow[:, None])
    u = (ar - BR // 2).to(tl.float32)
    if lg2 * (BR // 2) > -100.0:  # (branches yield p itself: no [BR, BR] decay tile held beside it)
        p = p * tl.exp2(lg2 * u)[:, None] * tl.exp2(-lg2 * u)[None, :]
    else:
        p = p * tl.exp2(lg2 * tl.maximum(ar[:, None] - ar[None, :], 0).to(tl.float32))
    p = tl.where(keep, p, 0.0)
    rs = tl.sum(p, 1)
    tl.store(a_rows + orr[None, :], p.to(A.dtype.element_ty), mask=mr[:, None])

    # The chunk's earlier column blocks, then zeros up to the chunk's end (read, never used).
    ac = tl.arange(0, BC)
    for j0 in range(c0, r0, BC):
        oc = j0 + ac
        pc = tl.zeros([BR, BC], dtype=tl.float32)
        for e0 in range(0, E, BE):
            oe = e0 + tl.arange(0, BE)
            x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
            kc = tl.load(bb + oc[:, None].to(tl.int64) * sbt + oe[None, :])
            pc = tl.dot(x, tl.trans(kc), pc, input_precision=prec)
        pc = pc * tl.exp2(lg2 * ar.to(tl.float32))[:, None] * tl.exp2(lg2 * (r0 - oc).to(tl.float32))[None, :]
        if RESET:
            pc = tl.where(oc[None, :] >= drow[:, None], pc, 0.0)
        rs += tl.sum(pc, 1)
        tl.store(a_rows + oc[None, :], pc.to(A.dtype.element_ty), mask=mr[:, None])
    zeros = tl.zeros([BR, BC], dtype=A.dtype.element_ty)
    for j0 in range(r0 + BR, c0 + C, BC):
        tl.store(a_rows + (j0 + ac)[None, :], zeros, mask=mr[:, None])

    if ROW_SUMS:
        zq = tl.zeros([BR], dtype=tl.float32)
        for e0 in range(0, E, BE):
            oe = e0 + tl.arange(0, BE)
            x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
            zq += tl.sum(x.to(tl.float32) * tl.load(Z + (bh * N + n) * E + oe)[None, :], 1)
        rdec = tl.exp2(lg2 * (orr - c0 + 1).to(tl.float32))
        if RESET:
            rdec = tl.where(drow < c0, rdec, 0.0)
        rs += zq * rdec
        tl.store(RS + (b * T + orr) * H + h, rs, mask=mr)  # s [B, T, H] fp32
