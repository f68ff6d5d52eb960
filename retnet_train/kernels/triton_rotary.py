"""The rotation of rotary.split_heads for the Triton retention path: the q and k heads of a packed
q|k|v projection rotated (k also scaled) in one pass, and the inverse that turns the gradients of
the rotated heads into those of the projection, in place. Math in fp32, one rounding at the store,
as torch.compile computes rotary.apply_rotary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_retention_launch import INTERPRET


# ---------------------------------------------------------------------------------------------
# Rows t of head j (of 2H: q heads, then k heads, which take `k_scale` too), BT rows per program.
# Forward: y = x c + rot(x) s with rot(x) = (-x_1, x_0) per pair (2i, 2i+1) and x the scaled head.
# INVERSE (the forward's backward): dx = (dy c + rot^T(dy s)) * scale, rot^T(z) = (z_1, -z_0).
# sin / cos: [T, K]. X and OUT may be the same memory (each program reads its tile before storing).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rotary_kernel(
    X,
    SIN,
    COS,
    OUT,
    T,
    H,
    k_scale,
    sxb,
    sxt,
    sxh,
    sob,
    sot,
    soh,
    K: tl.constexpr,
    INVERSE: tl.constexpr,
    BT: tl.constexpr,
):
    pid_t, j, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pid_t * BT + tl.arange(0, BT)
    cols = tl.arange(0, K)
    m = rows[:, None] < T
    x = tl.load(X + b * sxb + j * sxh + rows[:, None].to(tl.int64) * sxt + cols[None, :], mask=m, other=0.0)
    sc = rows[:, None] * K + cols[None, :]
    s = tl.load(SIN + sc, mask=m, other=0.0).to(tl.float32)
    c = tl.load(COS + sc, mask=m, other=0.0).to(tl.float32)
    scale = tl.where(j >= H, k_scale, 1.0)
    x = x.to(tl.float32)
    if INVERSE:
        even, odd = tl.split(tl.reshape(x * s, [BT, K // 2, 2]))
        y = (x * c + tl.reshape(tl.join(odd, -even), [BT, K])) * scale
    else:
        x = x * scale
        even, odd = tl.split(tl.reshape(x, [BT, K // 2, 2]))
        y = x * c + tl.reshape(tl.join(-odd, even), [BT, K]) * s
    out = OUT + b * sob + j * soh + rows[:, None].to(tl.int64) * sot + cols[None, :]
    tl.store(out, y.to(OUT.dtype.element_ty), mask=m)


def _launch(x, sin, cos, out, n_heads, inverse):
    B, T, NH, K = x.shape
    BT = max(1, min(64, 8192 // K))
    opts = {} if INTERPRET else {"num_warps": 4}
    grid = (triton.cdiv(T, BT), NH, B)
    _rotary_kernel[grid](
        x, sin, cos, out, T, n_heads, K**-0.5, *x.stride()[:3], *out.stride()[:3], K=K, INVERSE=inverse, BT=BT, **opts
    )


def rotate_qk(qkv, sin, cos, n_heads: int, key_dim: int):
    """qkv [B, T, H*K + H*K + ...] -> its q and k heads rotated (k scaled by K^-1/2): [B, T, 2H, K]
    contiguous, q heads first. sin / cos: [T, K] (any float dtype)."""
    B, T, _ = qkv.shape
    qk = qkv[..., : 2 * n_heads * key_dim].unflatten(-1, (2 * n_heads, key_dim))
    out = torch.empty(B, T, 2 * n_heads, key_dim, device=qkv.device, dtype=qkv.dtype)
    _launch(qk, sin.contiguous(), cos.contiguous(), out, n_heads, inverse=False)
    return out


def unrotate_qk_(dqkv, sin, cos, n_heads: int, key_dim: int):
    """In place: the gradients of rotate_qk's output, stored in dqkv's q and k blocks, become those of
    its input (the rest of dqkv is left as it is)."""
    dqk = dqkv[..., : 2 * n_heads * key_dim].unflatten(-1, (2 * n_heads, key_dim))
    _launch(dqk, sin.contiguous(), cos.contiguous(), dqk, n_heads, inverse=True)
    return dqkv
