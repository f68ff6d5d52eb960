"""The forward state scan's carry pass when it runs in segments (triton_retention_states._states_kernel
with several segments; launched by triton_retention_launch.launch_carry). Triton device code.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# Segments: at a small batch the forward scan has fewer programs than the GPU has room for, and each
# walks all N chunks. _states_kernel then runs P segments of SEG chunks side by side, each from a
# zero state, and stores each segment's own final state in FIN[bh, p] (fp32). This pass adds what
# enters each later segment: c_1 = FIN[bh, 0], c_p = F_{p-1} c_{p-1} + FIN[bh, p-1] (F_j: segment
# j's total decay), and S_n of segment p >= 1 gains gamma^(c0_n - a_p) c_p (a_p: the segment's first
# token), the final state (n = N, slot P-1) the same with c0_n = T; a decay product is 0 when a
# document starts within it. One program per BLOCK elements of one state (z: BZ >= DX, by the
# programs of the first block) and per chunk n >= SEG.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _states_carry_kernel(
    S,
    Z,
    FIN,
    ZFIN,
    DOC,
    lg2_ptr,
    T,
    H,
    N,
    C,
    SEG,
    P,
    DX: tl.constexpr,
    DY: tl.constexpr,
    WITH_Z: tl.constexpr,
    RESET: tl.constexpr,
    BLOCK: tl.constexpr,
    BZ: tl.constexpr,
):
    pe, n, bh = tl.program_id(0), SEG + tl.program_id(1), tl.program_id(2).to(tl.int64)
    p = tl.minimum(n // SEG, P - 1)
    lg2 = tl.load(lg2_ptr + bh % H)
    doc = DOC + (bh // H) * T
    a = p * SEG * C
    pos = tl.minimum(n * C, T)
    g = _segment_decay(doc, lg2, a, pos, RESET)
    off = pe * BLOCK + tl.arange(0, BLOCK)
    ok = off < DX * DY
    c = _carry_in(FIN + bh * P * DX * DY, DX * DY, off, ok, doc, lg2, p, SEG * C, T, RESET)
    if n < N:
        _add(S + (bh * N + n) * DX * DY + off, g * c, ok)
    else:
        _add(FIN + (bh * P + P - 1) * DX * DY + off, g * c, ok)
    if WITH_Z:
        if pe == 0:
            oz = tl.arange(0, BZ)
            okz = oz < DX
            cz = _carry_in(ZFIN + bh * P * DX, DX, oz, okz, doc, lg2, p, SEG * C, T, RESET)
            if n < N:
                _add(Z + (bh * N + n) * DX + oz, g * cz, okz)
            else:
                _add(ZFIN + (bh * P + P - 1) * DX + oz, g * cz, okz)


# ptr[mask] += x, summed in fp32 and stored in ptr's dtype (the states S may be bf16). (A helper, not a
# pointer bound in both branches of an `if`: Triton's compiler refuses a name of two types there.)
@triton.jit
def _add(ptr, x, mask):
    tl.store(ptr, (tl.load(ptr, mask=mask).to(tl.float32) + x).to(ptr.dtype.element_ty), mask=mask)


# gamma^(end - a), the decay from token a to token end, 0 when a document starts in (a, end).
@triton.jit
def _segment_decay(doc, lg2, a, end, RESET: tl.constexpr):
    f = tl.exp2(lg2 * (end - a).to(tl.float32))
    if RESET:
        f = tl.where(tl.load(doc + tl.maximum(end - 1, 0)) < a, f, 0.0)
    return f


# The state entering segment p (p >= 1) at elements off: the segments' own final states (slots of
# `stride` elements from fin) carried through the decays of segments 1 .. p-1 (L tokens each).
@triton.jit
def _carry_in(fin, stride, off, ok, doc, lg2, p, L, T, RESET: tl.constexpr):
    c = tl.load(fin + off, mask=ok, other=0.0)
    for j in range(1, p):
        f = _segment_decay(doc, lg2, j * L, tl.minimum(j * L + L, T), RESET)
        c = c * f + tl.load(fin + j * stride + off, mask=ok, other=0.0)
    return c
