"""The chunk states of triton_retention.py in two parallel-then-short passes, an alternative to the
sequential scans of triton_retention_states.py (RETNET_TRITON_STATES=sums; Triton device code,
launching in triton_retention_launch.py):

  _chunk_sums_kernel: each chunk's own contribution U_n = sum_{t in n} d_t x_t^T y_t (and, WITH_Z,
      u_n = sum d_t x_t), one program per chunk and [BX, BY] tile: a batched product, no chain.
  _scan_kernel:       S_{n+1} = f_n S_n + U_n over the chunks in scan order, elementwise over
      BLOCK entries of the [DX, DY] state per program (memory-bound).

Same recurrences, decays and document masks as _states_tile (one chunk's sum: _add_chunk): forward (X, Y = k, v) d_t =
gamma^(end-1-t), 0 before the chunk's last document start; reverse (X, Y = q, dO) d_t =
gamma^(t-c0+1), 0 from a document start in the chunk on; f_n = gamma^(len_n), 0 when a document
starts in chunk n.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_retention_states import _add_chunk


@triton.jit
def _chunk_sums_kernel(
    X,
    Y,
    U,
    ZU,
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
    DX: tl.constexpr,
    DY: tl.constexpr,
    REVERSE: tl.constexpr,
    WITH_Z: tl.constexpr,
    RESET: tl.constexpr,
    IEEE: tl.constexpr,
    BX: tl.constexpr,
    BY: tl.constexpr,
    BT: tl.constexpr,
):
    px, py, pz = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    bh, n = pz // N, pz % N
    b, h = bh // H, bh % H
    lg2 = tl.load(lg2_ptr + h)
    ox = px * BX + tl.arange(0, BX)
    oy = py * BY + tl.arange(0, BY)
    c0 = n * C
    end = tl.minimum(c0 + C, T)
    xb = X + b * sxb + h * sxh
    yb = Y + b * syb + h * syh
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    z = tl.zeros([BX], dtype=tl.float32)
    acc, z = _add_chunk(
        acc, z, xb, yb, sxt, syt, ox, oy, DOC + b * T, lg2, c0, C, end, REVERSE, WITH_Z, RESET, IEEE, BT
    )
    tl.store(U + pz * DX * DY + ox[:, None] * DY + oy[None, :], acc.to(U.dtype.element_ty))
    if WITH_Z:
        tl.store(ZU + pz * DX + ox, z, mask=ox * 0 + py == 0)  # one program per row tile writes z


# S_n (stored, S's dtype) = the state entering chunk n in scan order, then S <- f_n S + U_n; FIN the
# state after the last chunk (fp32). WITH_Z: the row-sum state z [DX] the same way, by each state's
# program 0 (BLOCK >= DX).
@triton.jit
def _scan_kernel(
    U,
    ZU,
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
    DXY: tl.constexpr,
    DX: tl.constexpr,
    REVERSE: tl.constexpr,
    WITH_Z: tl.constexpr,
    HAS_S0: tl.constexpr,
    RESET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    lg2 = tl.load(lg2_ptr + h)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    m = o < DXY
    mz = (o < DX) & (o * 0 + pid == 0)  # (a vector test: the interpreter cannot & a scalar bool)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    z = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_S0:
        acc += tl.load(S0 + bh * DXY + o, mask=m, other=0.0).to(tl.float32)
        if WITH_Z:
            z += tl.load(Z0 + bh * DX + o, mask=mz, other=0.0)
    for i in range(N):
        if REVERSE:
            n = N - 1 - i
        else:
            n = i
        c0 = n * C
        end = tl.minimum(c0 + C, T)
        f = tl.exp2(lg2 * (end - c0).to(tl.float32))
        if RESET:
            f = tl.where(tl.load(DOC + b * T + end - 1) < c0, f, 0.0)
        tl.store(S + (bh * N + n) * DXY + o, acc.to(S.dtype.element_ty), mask=m)
        acc = f * acc + tl.load(U + (bh * N + n) * DXY + o, mask=m, other=0.0).to(tl.float32)
        if WITH_Z:
            tl.store(Z + (bh * N + n) * DX + o, z, mask=mz)
            z = f * z + tl.load(ZU + (bh * N + n) * DX + o, mask=mz, other=0.0)
    tl.store(FIN + bh * DXY + o, acc, mask=m)
    if WITH_Z:
        tl.store(ZFIN + bh * DX + o, z, mask=mz)
