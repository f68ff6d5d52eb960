"""The output and gradient pass of triton_retention.py: `_apply_kernel` computes o (with the row sums),
dq, dk or dv for one row block of a chunk, the intra-chunk scores recomputed in registers (Triton
device code; autotune configs and launching in triton_retention_launch.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# OUT_r = rdec_r (X_r @ M_n) + sum_c P_rc Y_c over the BR rows r of one chunk n and a BD-wide
# column tile, with P_rc = gamma^|r-c| (X_r . B_c) for the chunk's columns c on the causal side
# (c <= r; KEY_ROWS: c >= r) in the same document, and rdec_r = gamma^(r-c0+1) (query rows; 0
# after a document start in the chunk) or gamma^(end-1-r) (key rows; 0 before the chunk's last
# document start). M_n [E, D] is stored [BH, N, E, D] or, TRANS_M, [BH, N, D, E].
# Three phases, so that at most one fp32 accumulator beside the output's is live (registers):
#   1. the diagonal [BR, BR] block of P (an E loop), masked, decayed, kept as MMA input (dtype);
#   2. X @ M_n (an E loop) into the output tile, times rdec, + P_diag @ Y;
#   3. the chunk's other column blocks on the causal side, BC columns each: P (an E loop), + P @ Y.
# P is a register tile, never stored. The diagonal block's decay is an outer product of two
# vectors centred on it (factors <= gamma^(-BR/2)) unless gamma^(BR/2) would underflow, then an
# elementwise exp2; the other blocks' decays split at the block edge (both factors <= 1).
# ROW_SUMS (forward): also s_r = sum_c P_rc + rdec_r X_r . z_n in fp32 from the unrounded P.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _apply_kernel(
    X,
    B,
    Y,
    M,
    OUT,
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
    syb,
    syt,
    syh,
    sob,
    sot,
    soh,
    E: tl.constexpr,
    D: tl.constexpr,
    KEY_ROWS: tl.constexpr,
    TRANS_M: tl.constexpr,
    ROW_SUMS: tl.constexpr,
    RESET: tl.constexpr,
    IEEE: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
):
    tl.static_assert(BR % BC == 0, "column blocks must tile a row block (phase 3 stops at its edge)")
    pid_r, pid_d, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b, h = bh // H, bh % H
    lg2 = tl.load(lg2_ptr + h)
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    r0 = pid_r * BR
    n = r0 // C
    c0 = n * C
    end = tl.minimum(c0 + C, T)
    ar = tl.arange(0, BR)
    orr = r0 + ar
    mr = orr < T
    od = pid_d * BD + tl.arange(0, BD)
    x_rows = X + b * sxb + h * sxh + orr[:, None].to(tl.int64) * sxt
    bb = B + b * sbb + h * sbh
    yb = Y + b * syb + h * syh
    doc = DOC + b * T
    drow = orr
    if RESET:
        drow = tl.load(doc + orr, mask=mr, other=0)

    # 1. Diagonal block (rows and columns at the same positions).
    p = tl.zeros([BR, BR], dtype=tl.float32)
    zq = tl.zeros([BR], dtype=tl.float32)
    for e0 in range(0, E, BE):
        oe = e0 + tl.arange(0, BE)
        x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
        kb = tl.load(bb + orr[:, None].to(tl.int64) * sbt + oe[None, :], mask=mr[:, None], other=0.0)
        p = tl.dot(x, tl.trans(kb), p, input_precision=prec)
    if ROW_SUMS:
        # A loop of its own: x also feeding this sum inside the pipelined MMA loop above gave wrong o and
        # row sums on an H200 (wgmma, E 256 / D 512, several configs), right ones in the interpreter.
        for e0 in range(0, E, BE):
            oe = e0 + tl.arange(0, BE)
            x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
            zq += tl.sum(x.to(tl.float32) * tl.load(Z + (bh * N + n) * E + oe)[None, :], 1)
    if KEY_ROWS:
        keep = ar[None, :] >= ar[:, None]
        sg = -1.0
    else:
        keep = ar[:, None] >= ar[None, :]
        sg = 1.0
    if RESET:
        if KEY_ROWS:
            keep = keep & (orr[:, None] >= drow[None, :])
        else:
            keep = keep & (orr[None, :] >= drow[:, None])
    u = (ar - BR // 2).to(tl.float32)
    if lg2 * (BR // 2) > -100.0:  # (branches yield p itself: no [BR, BR] decay tile held beside it)
        p = p * tl.exp2(sg * lg2 * u)[:, None] * tl.exp2(-sg * lg2 * u)[None, :]
    else:
        dist = ar[:, None] - ar[None, :]
        if KEY_ROWS:
            dist = -dist
        p = p * tl.exp2(lg2 * tl.maximum(dist, 0).to(tl.float32))
    p = tl.where(keep, p, 0.0)
    rs = tl.sum(p, 1)
    p_diag = p.to(Y.dtype.element_ty)

    # 2. State term, row decay, diagonal block.
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    mbase = M + (bh * N + n) * E * D
    for e0 in range(0, E, BE):
        oe = e0 + tl.arange(0, BE)
        x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
        if TRANS_M:
            m = tl.load(mbase + od[None, :] * E + oe[:, None])
        else:
            m = tl.load(mbase + oe[:, None] * D + od[None, :])
        acc = tl.dot(x, m, acc, input_precision=prec)
    if KEY_ROWS:
        rdec = tl.exp2(lg2 * tl.maximum(end - 1 - orr, 0).to(tl.float32))
        if RESET:
            rdec = tl.where(orr >= tl.load(doc + end - 1), rdec, 0.0)
    else:
        rdec = tl.exp2(lg2 * (orr - c0 + 1).to(tl.float32))
        if RESET:
            rdec = tl.where(drow < c0, rdec, 0.0)
    acc = acc * rdec[:, None]
    rs += zq * rdec
    y = tl.load(yb + orr[:, None].to(tl.int64) * syt + od[None, :], mask=mr[:, None], other=0.0)
    acc = tl.dot(p_diag, y, acc, input_precision=prec)

    # 3. The chunk's other column blocks on the causal side.
    if KEY_ROWS:
        lo, hi = r0 + BR, end
    else:
        lo, hi = c0, r0
    ac = tl.arange(0, BC)
    for j0 in range(lo, hi, BC):
        oc = j0 + ac
        mc = oc < T
        pc = tl.zeros([BR, BC], dtype=tl.float32)
        for e0 in range(0, E, BE):
            oe = e0 + tl.arange(0, BE)
            x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
            kc = tl.load(bb + oc[:, None].to(tl.int64) * sbt + oe[None, :], mask=mc[:, None], other=0.0)
            pc = tl.dot(x, tl.trans(kc), pc, input_precision=prec)
        # gamma^|r-c| split at the column block's edge (KEY_ROWS) or the row block's: both exponents >= 0
        if KEY_ROWS:
            pc = pc * tl.exp2(lg2 * (j0 - orr).to(tl.float32))[:, None] * tl.exp2(lg2 * ac.to(tl.float32))[None, :]
            if RESET:
                pc = tl.where(orr[:, None] >= tl.load(doc + oc, mask=mc, other=0)[None, :], pc, 0.0)
        else:
            pc = pc * tl.exp2(lg2 * ar.to(tl.float32))[:, None] * tl.exp2(lg2 * (r0 - oc).to(tl.float32))[None, :]
            if RESET:
                pc = tl.where(oc[None, :] >= drow[:, None], pc, 0.0)
        rs += tl.sum(pc, 1)
        yc = tl.load(yb + oc[:, None].to(tl.int64) * syt + od[None, :], mask=mc[:, None], other=0.0)
        acc = tl.dot(pc.to(yc.dtype), yc, acc, input_precision=prec)

    ob = OUT + b * sob + h * soh
    tl.store(ob + orr[:, None].to(tl.int64) * sot + od[None, :], acc.to(OUT.dtype.element_ty), mask=mr[:, None])
    if ROW_SUMS:
        tl.store(RS + (b * T + orr) * H + h, rs, mask=mr & (orr * 0 + pid_d == 0))  # s [B, T, H] fp32
