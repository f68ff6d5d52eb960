"""The Triton kernels of triton_retention.py (device code, autotune configs, launch helper); the
host side, the autograd Function and the design notes are there.

Two kernels serve the forward and the backward:
  _states_kernel: the chunk-entry states of a decayed linear recurrence, sequential over chunks
      with a [BX, BY] tile of the state in fp32 registers (forward: S_n from k, v; reverse: the
      state gradients dG_n from q, dO), each stored once in the input dtype.
  _apply_kernel:  OUT_r = rdec_r (X_r @ M_n) + sum_c P_rc Y_c for the rows r of one chunk n, with
      P_rc = gamma^|r-c| (X_r . B_c) recomputed in registers (causal: c <= r; KEY_ROWS: c >= r,
      within the chunk, same document). It computes o, dq, dk and dv (see triton_retention.py).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under RETNET_TRITON_AUTOTUNE=0 each kernel runs its first valid config (no tuning on a first call).
AUTOTUNE = os.environ.get("RETNET_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET


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
    HAS_S0: tl.constexpr,
    RESET: tl.constexpr,
    IEEE: tl.constexpr,
    BX: tl.constexpr,
    BY: tl.constexpr,
    BT: tl.constexpr,
):
    _states_tile(
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
        tl.program_id(0),
        tl.program_id(1),
        tl.program_id(2).to(tl.int64),
        DX,
        DY,
        REVERSE,
        WITH_Z,
        HAS_S0,
        RESET,
        IEEE,
        BX,
        BY,
        BT,
    )


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
    if pz < BH:
        _states_tile(
            K_,
            V_,
            S,
            FIN,
            S0,
            FIN,
            FIN,
            FIN,
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
            pz,
            DX,
            DY,
            False,
            False,
            HAS_S0,
            RESET,
            IEEE,
            BX,
            BY,
            BT,
        )
    else:
        _states_tile(
            Q_,
            DO,
            G,
            GFIN,
            GFIN,
            GFIN,
            GFIN,
            GFIN,
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
            pz - BH,
            DX,
            DY,
            True,
            False,
            False,
            RESET,
            IEEE,
            BX,
            BY,
            BT,
        )


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
    tile = ox[:, None] * DY + oy[None, :]  # offsets in one [DX, DY] state
    # z is written by one program per row tile (a vector test: the interpreter cannot & a scalar bool)
    z_mask = ox * 0 + py == 0
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    z = tl.zeros([BX], dtype=tl.float32)
    if HAS_S0:
        acc += tl.load(S0 + bh * DX * DY + tile).to(tl.float32)
        if WITH_Z:
            z += tl.load(Z0 + bh * DX + ox)
    xb = X + b * sxb + h * sxh
    yb = Y + b * syb + h * syh
    doc = DOC + b * T
    for i in range(N):
        if REVERSE:
            n = N - 1 - i
        else:
            n = i
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
    tl.store(FIN + bh * DX * DY + tile, acc)
    if WITH_Z:
        tl.store(ZFIN + bh * DX + ox, z, mask=z_mask)


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


# ---------------------------------------------------------------------------------------------
# Configs and launching
# ---------------------------------------------------------------------------------------------
def _configs(names, rows):
    """triton.Config list from tuples (meta..., num_warps, num_stages)."""
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


def _divisor_block(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n (n a multiple of 16)."""
    b = cap
    while n % b:
        b //= 2
    return b


# Few configs: each costs a compile (5-20 s at K 256 / V 512) on the first call of a shape. All of
# them compile for sm_90a to wgmma without (or with a few bytes of) spills at K 256 / V 512 and
# K 128 / V 256, bf16, with and without resets.
# The states pass runs B*H*(K/BX)*(V/BY) programs, each walking all chunks in order: at B1 H8 K128 V256
# 64 x 64 tiles make 64 programs for an H200's 132 SMs, so the narrower tiles (2-4x the programs, each
# with a shorter dependent chain of MMAs) compete in the autotuning. RETNET_TRITON_STATES_TILES=wide
# tunes over the 64-row tiles only (to compare both on one GPU).
WIDE_STATE_TILES = [(64, 128, 64, 4, 3), (64, 64, 64, 4, 3)]
FINE_STATE_TILES = [(32, 128, 64, 4, 3), (32, 64, 64, 4, 3), (16, 64, 64, 4, 3)]
_STATE_TILES = WIDE_STATE_TILES
if os.environ.get("RETNET_TRITON_STATES_TILES", "fine") != "wide":
    _STATE_TILES = WIDE_STATE_TILES + FINE_STATE_TILES
STATES_CONFIGS = _configs(("BX", "BY", "BT"), _STATE_TILES)
APPLY_CONFIGS = _configs(
    ("BR", "BC", "BD", "BE"), [(128, 64, 128, 64, 8, 3), (64, 64, 256, 64, 8, 2), (64, 64, 128, 64, 4, 3)]
)


# fp32 inputs run IEEE fp32 MMAs (FMA code, no tensor cores): small tiles keep their code and compile
# time small (128-row tiles take minutes to compile and spill); for tests and checks, not speed.
FP32_CONFIGS = {
    "states": _configs(("BX", "BY", "BT"), [(32, 32, 32, 4, 1)]),
    "apply": _configs(("BR", "BC", "BD", "BE"), [(32, 32, 32, 32, 4, 1)]),
}


def _prune_states(configs, nargs, **kwargs):
    a = {**nargs, **kwargs}  # (the autotuner passes positional and keyword arguments apart)
    DX, DY, C = a["DX"], a["DY"], a["C"]
    keep = [c for c in configs if DX % c.kwargs["BX"] == 0 and DY % c.kwargs["BY"] == 0 and C % c.kwargs["BT"] == 0]
    meta = dict(BX=_divisor_block(DX, 64), BY=_divisor_block(DY, 64), BT=_divisor_block(C, 64))
    return keep or [triton.Config(meta, num_warps=4, num_stages=2)]


def _prune_apply(configs, nargs, **kwargs):
    """Row blocks never straddle a chunk (BR divides C); tiles divide the head dims."""
    a = {**nargs, **kwargs}
    E, D, C = a["E"], a["D"], a["C"]
    keep = [c for c in configs if C % c.kwargs["BR"] == 0 and D % c.kwargs["BD"] == 0 and E % c.kwargs["BE"] == 0]
    br = _divisor_block(C, 64)
    meta = dict(BR=br, BC=br, BD=_divisor_block(D, 128), BE=_divisor_block(E, 64))
    return keep or [triton.Config(meta, num_warps=4, num_stages=2)]


def _tuned(fn, configs, key, prune):
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(fn)


states_tuned = _tuned(_states_kernel, STATES_CONFIGS, ["DX", "DY", "C", "REVERSE", "WITH_Z", "RESET"], _prune_states)
apply_tuned = _tuned(
    _apply_kernel, APPLY_CONFIGS, ["E", "D", "C", "KEY_ROWS", "TRANS_M", "ROW_SUMS", "RESET"], _prune_apply
)
states_pair_tuned = _tuned(_states_pair_kernel, STATES_CONFIGS, ["DX", "DY", "C", "HAS_S0", "RESET"], _prune_states)
KERNELS = {
    "states": (_states_kernel, states_tuned, STATES_CONFIGS, _prune_states),
    "states_pair": (_states_pair_kernel, states_pair_tuned, STATES_CONFIGS, _prune_states),
    "apply": (_apply_kernel, apply_tuned, APPLY_CONFIGS, _prune_apply),
}

# Tests override block shapes per kernel name (states_pair takes the states' shapes).
FIXED_META: dict = {}


def _fixed_config(configs, prune, args, fixed: dict):
    """The first valid config, with `fixed`'s block shapes: on a GPU with the warps and stages of the
    config that has those shapes (a forced config then compiles as the autotuner would run it)."""
    same = [c for c in configs if c.kwargs == fixed]
    base = same[0] if same else prune(configs, args)[0]
    return triton.Config({**base.kwargs, **fixed}, num_warps=base.num_warps, num_stages=base.num_stages)


def launch(name, grid, args: dict):
    """Run kernel `name` with keyword args: autotuned on GPU (bf16/fp16); otherwise the first valid
    config (with FIXED_META's overrides). grid: meta -> grid tuple."""
    raw, tuned, configs, prune = KERNELS[name]
    fixed = FIXED_META.get(name.removesuffix("_pair"), {})
    if args["IEEE"]:
        configs = FP32_CONFIGS[name.removesuffix("_pair")]
    elif AUTOTUNE and not fixed:
        tuned[grid](**args)
        return
    cfg = _fixed_config(configs, prune, args, fixed)
    opts = {} if INTERPRET else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    raw[grid(cfg.kwargs)](**args, **cfg.kwargs, **opts)
