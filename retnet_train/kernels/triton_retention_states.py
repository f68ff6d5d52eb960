"""The chunk-state scans of triton_retention.py (Triton device code; autotune configs and launching in
triton_retention_launch.py).

  _states_kernel:      the forward's chunk-entry states S_n from k, v: a decayed linear recurrence,
      sequential over chunks with a [BX, BY] tile of the state in fp32 registers, each stored once
      in the input dtype.
  _states_pair_kernel: the backward's two scans in one launch: S_n again, and in reverse the state
      gradients dG_n from q, dO.
  _states_tile:        the scan of one tile, shared by both.
  _add_chunk:          one chunk's decayed sum into a tile.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# States. Forward (X, Y = k, v): S_0 = the incoming state, S_{n+1} = f_n S_n + sum_{t in n}
# gamma^(end_n-1-t) k_t^T v_t with f_n = gamma^(len_n), 0 when a document starts in chunk n (and
# keys before the chunk's last document start dropped). Stores S_n (n < N) and the final state
# (fp32); WITH_Z also the decayed key sums z_n (the row-sum state, fp32).
# Reverse (X, Y = q, dO): dG_{N-1} = 0, dG_{n-1} = f_n dG_n + sum_{t in n} gamma^(t-c0_n+1) q_t^T dO_t
# (queries after a document start in chunk n dropped): dG_n is what chunk n's keys receive from
# later chunks. DOC [B, T] int32: the position of the last document start at or before t (-1: none).
# Per program: a [BX, BY] tile over all N chunks (no per-chunk summaries in memory).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _states_kernel(
    X,
    Y,
    S,
    Z,
    S0,
    Z0,
    FIN,
    ZFIN,
    DOC,
    lg2_ptr,
    T,
    H,
    N,
    C,
    BH,
    SEG,
    sxb,
    sxt,
    sxh,
    syb,
    syt,
    syh,
    DX: tl.constexpr,
    DY: tl.constexpr,
    WITH_Z: tl.constexpr,
    HAS_S0: tl.constexpr,
    RESET: tl.constexpr,
    IEEE: tl.constexpr,
    BX: tl.constexpr,
    BY: tl.constexpr,
    BT: tl.constexpr,
):
    pz = tl.program_id(2)  # segment-major: seg * BH + bh
    # arguments grouped as _states_tile's parameters: pointers; sizes; strides; program; constexprs
    # fmt: off
    _states_tile(
        X, Y, S, Z, S0, Z0, FIN, ZFIN, DOC, lg2_ptr,
        T, H, N, C,
        sxb, sxt, sxh, syb, syt, syh,
        tl.program_id(0), tl.program_id(1), (pz % BH).to(tl.int64), pz // BH, SEG, tl.num_programs(2) // BH,
        DX, DY, False, WITH_Z, HAS_S0, RESET, IEEE, BX, BY, BT,  # REVERSE False: the forward scan
    )
    # fmt: on


# The backward's two scans in one launch (twice the programs): S_n from (k, v) on program ids
# [0, BH) of the last axis, dG_n from (q, dO) on [BH, 2 BH). q/k and v/dO share strides.
@triton.jit
def _states_pair_kernel(
    K_,
    V_,
    S,
    S0,
    FIN,
    Q_,
    DO,
    G,
    GFIN,
    DOC,
    lg2_ptr,
    T,
    H,
    N,
    C,
    BH,
    sxb,
    sxt,
    sxh,
    syb,
    syt,
    syh,
    DX: tl.constexpr,
    DY: tl.constexpr,
    HAS_S0: tl.constexpr,
    RESET: tl.constexpr,
    IEEE: tl.constexpr,
    BX: tl.constexpr,
    BY: tl.constexpr,
    BT: tl.constexpr,
):
    px, py, pz = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    # arguments grouped as _states_tile's parameters: pointers; sizes; strides; program; constexprs
    if pz < BH:
        # fmt: off
        _states_tile(
            K_, V_, S, FIN, S0, FIN, FIN, FIN, DOC, lg2_ptr,  # (FIN for the unused Z, Z0, ZFIN)
            T, H, N, C,
            sxb, sxt, sxh, syb, syt, syh,
            px, py, pz, 0, N, 1,
            DX, DY, False, False, HAS_S0, RESET, IEEE, BX, BY, BT,
        )
        # fmt: on
    else:
        # fmt: off
        _states_tile(
            Q_, DO, G, GFIN, GFIN, GFIN, GFIN, GFIN, DOC, lg2_ptr,  # (GFIN for the unused Z, S0, Z0, ZFIN)
            T, H, N, C,
            sxb, sxt, sxh, syb, syt, syh,
            px, py, pz - BH, 0, N, 1,
            DX, DY, True, False, False, RESET, IEEE, BX, BY, BT,  # REVERSE: dG_n, from the last chunk back
        )
        # fmt: on


@triton.jit
def _states_tile(
    X,
    Y,
    S,
    Z,
    S0,
    Z0,
    FIN,
    ZFIN,
    DOC,
    lg2_ptr,
    T,
    H,
    N,
    C,
    sxb,
    sxt,
    sxh,
    syb,
    syt,
    syh,
    px,
    py,
    bh,
    seg,
    SEG,
    P,
    DX: tl.constexpr,
    DY: tl.constexpr,
    REVERSE: tl.constexpr,
    WITH_Z: tl.constexpr,
    HAS_S0: tl.constexpr,
    RESET: tl.constexpr,
    IEEE: tl.constexpr,
    BX: tl.constexpr,
    BY: tl.constexpr,
    BT: tl.constexpr,
):
    b, h = bh // H, bh % H
    lg2 = tl.load(lg2_ptr + h)
    ox = px * BX + tl.arange(0, BX)
    oy = py * BY + tl.arange(0, BY)
    tile = ox[:, None] * DY + oy[None, :]  # offsets of the [BX, BY] tile in one [DX, DY] state
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    # z is written by one program per row tile (a vector test: the interpreter cannot & a scalar bool)
    z_mask = ox * 0 + py == 0
    z = tl.zeros([BX], dtype=tl.float32)
    if HAS_S0:
        if seg == 0:  # later segments start from zero (a carry pass adds what enters them)
            acc += tl.load(S0 + bh * DX * DY + tile).to(tl.float32)
            if WITH_Z:
                z += tl.load(Z0 + bh * DX + ox)
    xb = X + b * sxb + h * sxh
    yb = Y + b * syb + h * syh
    doc = DOC + b * T
    n0 = seg * SEG
    n1 = tl.minimum(n0 + SEG, N)
    for i in range(n1 - n0):
        if REVERSE:
            n = n1 - 1 - i
        else:
            n = n0 + i
        c0 = n * C
        end = tl.minimum(c0 + C, T)
        tl.store(S + (bh * N + n) * DX * DY + tile, acc.to(S.dtype.element_ty))
        if WITH_Z:
            tl.store(Z + (bh * N + n) * DX + ox, z, mask=z_mask)
        f = tl.exp2(lg2 * (end - c0).to(tl.float32))
        if RESET:
            last = tl.load(doc + end - 1)
            f = tl.where(last < c0, f, 0.0)
        acc = acc * f
        z = z * f
        acc, z = _add_chunk(acc, z, xb, yb, sxt, syt, ox, oy, doc, lg2, c0, C, end, REVERSE, WITH_Z, RESET, IEEE, BT)
    tl.store(FIN + (bh * P + seg) * DX * DY + tile, acc)
    if WITH_Z:
        tl.store(ZFIN + (bh * P + seg) * DX + ox, z, mask=z_mask)


# acc [BX, BY] += sum_{t in chunk} d_t x_t^T y_t (and z [BX] += sum d_t x_t) over the chunk [c0, end),
# BT tokens at a time, with the scan direction's decays d_t and document masks (module comment).
@triton.jit
def _add_chunk(
    acc,
    z,
    xb,
    yb,
    sxt,
    syt,
    ox,
    oy,
    doc,
    lg2,
    c0,
    C,
    end,
    REVERSE: tl.constexpr,
    WITH_Z: tl.constexpr,
    RESET: tl.constexpr,
    IEEE: tl.constexpr,
    BT: tl.constexpr,
):
    if RESET:
        last = tl.load(doc + end - 1)  # the chunk's last document start
    for t0 in range(c0, c0 + C, BT):
        ot = t0 + tl.arange(0, BT)
        mt = ot < end
        x = tl.load(xb + ot[:, None].to(tl.int64) * sxt + ox[None, :], mask=mt[:, None], other=0.0)
        y = tl.load(yb + ot[:, None].to(tl.int64) * syt + oy[None, :], mask=mt[:, None], other=0.0)
        if REVERSE:
            d = tl.exp2(lg2 * (ot - c0 + 1).to(tl.float32))
            if RESET:
                d = tl.where(tl.load(doc + ot, mask=mt, other=0) < c0, d, 0.0)
        else:
            d = tl.exp2(lg2 * tl.maximum(end - 1 - ot, 0).to(tl.float32))
            if RESET:
                d = tl.where(ot >= last, d, 0.0)
        xd = x.to(tl.float32) * d[:, None]
        acc = tl.dot(tl.trans(xd.to(x.dtype)), y, acc, input_precision="ieee" if IEEE else "tf32")
        if WITH_Z:
            z += tl.sum(xd, 0)
    return acc, z
