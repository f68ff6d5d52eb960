"""The output and gradient pass of triton_retention.py: `_apply_kernel` computes o, dq, dk or dv for
one row block of a chunk and one column tile of the output, from the chunk's state and the scores
that triton_retention_scores._scores_kernel wrote (Triton device code; autotune configs and
launching in triton_retention_launch.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# OUT_r = rdec_r (X_r @ M_n) + sum_c P_rc Y_c over the BR rows r of one chunk n and a BD-wide
# column tile. Query rows: P = A (the chunk's decayed causal scores [B*H, T, C], row t, column
# c - c0), its columns up to the row block's end; KEY_ROWS: P = A^T, the rows from the row block's
# start to the chunk's end. rdec_r = gamma^(r-c0+1) (query rows; 0 after a document start in the
# chunk) or gamma^(end-1-r) (key rows; 0 before the chunk's last document start). M_n [E, D] is
# stored [BH, N, E, D] or, TRANS_M, [BH, N, D, E].
# ---------------------------------------------------------------------------------------------
@triton.jit
def _apply_kernel(
    X,
    A,
    Y,
    M,
    OUT,
    DOC,
    lg2_ptr,
    T,
    H,
    C,
    N,
    sxb,
    sxt,
    sxh,
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
    RESET: tl.constexpr,
    IEEE: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
):
    tl.static_assert(BR % BC == 0, "column blocks must tile a row block")
    pid_r, pid_d = tl.program_id(0), tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b, h = bh // H, bh % H
    lg2 = tl.load(lg2_ptr + h)
    r0 = pid_r * BR
    n = r0 // C
    c0 = n * C
    end = tl.minimum(c0 + C, T)
    orr = r0 + tl.arange(0, BR)
    mr = orr < T
    od = pid_d * BD + tl.arange(0, BD)
    x_rows = X + b * sxb + h * sxh + orr[:, None].to(tl.int64) * sxt
    yb = Y + b * syb + h * syh
    ab = A + bh * T * C - c0  # + t * C + c: score (t, c)
    acc = _state_term(x_rows, M + (bh * N + n) * E * D, mr, od, E, D, TRANS_M, IEEE, BR, BD, BE)
    acc = acc * _row_decay(DOC, b, T, lg2, orr, mr, c0, end, KEY_ROWS, RESET)[:, None]
    acc = _causal_term(acc, ab, yb, syt, orr, mr, od, r0, c0, end, T, C, KEY_ROWS, IEEE, BR, BC)
    ob = OUT + b * sob + h * soh
    tl.store(ob + orr[:, None].to(tl.int64) * sot + od[None, :], acc.to(OUT.dtype.element_ty), mask=mr[:, None])


@triton.jit
def _state_term(
    x_rows,
    mbase,
    mr,
    od,
    E: tl.constexpr,
    D: tl.constexpr,
    TRANS_M: tl.constexpr,
    IEEE: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    BE: tl.constexpr,
):
    """X_r @ M_n for the row block (x_rows: its rows of X) and the column tile od, [BR, BD] fp32."""
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    for e0 in range(0, E, BE):
        oe = e0 + tl.arange(0, BE)
        x = tl.load(x_rows + oe[None, :], mask=mr[:, None], other=0.0)
        if TRANS_M:
            m = tl.load(mbase + od[None, :] * E + oe[:, None])
        else:
            m = tl.load(mbase + oe[:, None] * D + od[None, :])
        acc = tl.dot(x, m, acc, input_precision="ieee" if IEEE else "tf32")
    return acc


@triton.jit
def _row_decay(DOC, b, T, lg2, orr, mr, c0, end, KEY_ROWS: tl.constexpr, RESET: tl.constexpr):
    """rdec_r of the rows orr (see above) of sequence b."""
    if KEY_ROWS:
        rdec = tl.exp2(lg2 * tl.maximum(end - 1 - orr, 0).to(tl.float32))
        if RESET:
            rdec = tl.where(orr >= tl.load(DOC + b * T + end - 1), rdec, 0.0)
    else:
        rdec = tl.exp2(lg2 * (orr - c0 + 1).to(tl.float32))
        if RESET:
            rdec = tl.where(tl.load(DOC + b * T + orr, mask=mr, other=0) < c0, rdec, 0.0)
    return rdec


@triton.jit
def _causal_term(
    acc,
    ab,
    yb,
    syt,
    orr,
    mr,
    od,
    r0,
    c0,
    end,
    T,
    C,
    KEY_ROWS: tl.constexpr,
    IEEE: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """acc + sum_c P_rc Y_c over the chunk's columns on the causal side of the row block, BC at a time."""
    if KEY_ROWS:
        lo, hi = r0, end
    else:
        lo, hi = c0, tl.minimum(r0 + BR, T)
    ac = tl.arange(0, BC)
    for j0 in range(lo, hi, BC):
        oc = j0 + ac
        mc = oc < T
        if KEY_ROWS:
            p = tl.load(ab + oc[None, :].to(tl.int64) * C + orr[:, None], mask=mc[None, :], other=0.0)
        else:
            p = tl.load(ab + orr[:, None].to(tl.int64) * C + oc[None, :], mask=mr[:, None], other=0.0)
        yc = tl.load(yb + oc[:, None].to(tl.int64) * syt + od[None, :], mask=mc[:, None], other=0.0)
        acc = tl.dot(p, yc, acc, input_precision="ieee" if IEEE else "tf32")
    return acc
