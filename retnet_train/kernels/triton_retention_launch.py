"""Autotune configs and the launch helper of triton_retention.py's kernels (device code in
triton_retention_states.py, triton_retention_carry.py, triton_retention_scores.py and
triton_retention_apply.py). Tests set FIXED_META to force block shapes.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .triton_retention_apply import _apply_kernel
from .triton_retention_carry import _states_carry_kernel
from .triton_retention_scores import _scores_kernel
from .triton_retention_states import _states_kernel, _states_pair_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under RETNET_TRITON_AUTOTUNE=0 each kernel runs its first valid config (no tuning on a first call).
AUTOTUNE = os.environ.get("RETNET_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
# Fused multiply-adds asked for, not left to Triton's default, which turns them off from Triton 3.10:
# the kernels compile to the same code (and speed) under every Triton.
COMPILE = {} if INTERPRET else {"enable_fp_fusion": True}


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
# 64 x 64 tiles make 64 programs for an H200's 132 SMs, so narrower tiles (2-4x the programs, each
# with a shorter dependent chain of MMAs) compete in the autotuning; 128-token steps win the forward
# scan at B2 H8 K256 V512 (223 us against 243, H200).
STATE_TILES = [  # BX, BY, BT, warps, stages
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 128, 128, 4, 2),
    (32, 128, 64, 4, 3),
    (32, 64, 64, 4, 3),
    (16, 64, 64, 4, 3),
]
APPLY_TILES = [  # BR, BC, BD, BE, warps, stages
    (128, 64, 128, 64, 8, 3),
    (128, 128, 128, 64, 8, 2),
    (64, 64, 256, 64, 8, 2),
    (64, 64, 128, 64, 4, 3),
    (128, 64, 256, 64, 8, 2),
]
STATES_CONFIGS = _configs(("BX", "BY", "BT"), STATE_TILES)
SCORES_CONFIGS = _configs(
    ("BR", "BC", "BE"), [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 128, 4, 2)]
)
APPLY_CONFIGS = _configs(("BR", "BC", "BD", "BE"), APPLY_TILES)

# fp32 inputs run IEEE fp32 MMAs (FMA code, no tensor cores): small tiles keep their code and compile
# time small (128-row tiles take minutes to compile and spill); for tests and checks, not speed.
FP32_CONFIGS = {
    "states": _configs(("BX", "BY", "BT"), [(32, 32, 32, 4, 1)]),
    "scores": _configs(("BR", "BC", "BE"), [(32, 32, 32, 4, 1)]),
    "apply": _configs(("BR", "BC", "BD", "BE"), [(32, 32, 32, 32, 4, 1)]),
}


def _prune_states(configs, nargs, **kwargs):
    a = {**nargs, **kwargs}  # (the autotuner passes positional and keyword arguments apart)
    DX, DY, C = a["DX"], a["DY"], a["C"]
    keep = [c for c in configs if DX % c.kwargs["BX"] == 0 and DY % c.kwargs["BY"] == 0 and C % c.kwargs["BT"] == 0]
    meta = dict(BX=_divisor_block(DX, 64), BY=_divisor_block(DY, 64), BT=_divisor_block(C, 64))
    return keep or [triton.Config(meta, num_warps=4, num_stages=2)]


def _prune_scores(configs, nargs, **kwargs):
    """Row blocks never straddle a chunk (BR divides C); slices divide the contracted head dim."""
    a = {**nargs, **kwargs}
    E, C = a["E"], a["C"]
    keep = [c for c in configs if C % c.kwargs["BR"] == 0 and E % c.kwargs["BE"] == 0]
    br = _divisor_block(C, 64)
    return keep or [triton.Config(dict(BR=br, BC=br, BE=_divisor_block(E, 64)), num_warps=4, num_stages=2)]


def _prune_apply(configs, nargs, **kwargs):
    """Row blocks never straddle a chunk (BR divides C); tiles divide the head dims."""
    a = {**nargs, **kwargs}
    E, D, C = a["E"], a["D"], a["C"]
    keep = [c for c in configs if C % c.kwargs["BR"] == 0 and D % c.kwargs["BD"] == 0 and E % c.kwargs["BE"] == 0]
    br = _divisor_block(C, 64)
    meta = dict(BR=br, BC=br, BD=_divisor_block(D, 128), BE=_divisor_block(E, 64))
    return keep or [triton.Config(meta, num_warps=4, num_stages=2)]


def _tuned(fn, configs, key, prune, reset_to_zero=None):
    prune_by = {"early_config_prune": prune}
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune_by, reset_to_zero=reset_to_zero)(fn)


states_tuned = _tuned(_states_kernel, STATES_CONFIGS, ["DX", "DY", "C", "WITH_Z", "RESET"], _prune_states)
apply_tuned = _tuned(_apply_kernel, APPLY_CONFIGS, ["E", "D", "C", "KEY_ROWS", "TRANS_M", "RESET"], _prune_apply)
# (the row-sum slots a config leaves unwritten must stay zero while the autotuner tries the others)
scores_tuned = _tuned(_scores_kernel, SCORES_CONFIGS, ["E", "C", "ROW_SUMS", "RESET"], _prune_scores, ["RS"])
states_pair_tuned = _tuned(_states_pair_kernel, STATES_CONFIGS, ["DX", "DY", "C", "HAS_S0", "RESET"], _prune_states)
KERNELS = {
    "states": (_states_kernel, states_tuned, STATES_CONFIGS, _prune_states),
    "states_pair": (_states_pair_kernel, states_pair_tuned, STATES_CONFIGS, _prune_states),
    "scores": (_scores_kernel, scores_tuned, SCORES_CONFIGS, _prune_scores),
    "apply": (_apply_kernel, apply_tuned, APPLY_CONFIGS, _prune_apply),
}

# Tests override block shapes per kernel name (states_pair takes the states' shapes).
FIXED_META: dict = {}
STATE_SHAPED = {"states_pair": "states"}


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
    family = STATE_SHAPED.get(name, name)
    fixed = FIXED_META.get(family, {})
    if args["IEEE"]:
        configs = FP32_CONFIGS[family]
    elif AUTOTUNE and not fixed:
        tuned[grid](**args, **COMPILE)
        return
    cfg = _fixed_config(configs, prune, args, fixed)
    opts = {} if INTERPRET else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **COMPILE}
    raw[grid(cfg.kwargs)](**args, **cfg.kwargs, **opts)


# The forward scan's segments: RETNET_TRITON_SCAN_SEGMENTS = a count (1: one scan per state tile), or
# `auto`, the default (scan_segments picks from the GPU's SM count). (Tests set SCAN_SEGMENTS.)
SCAN_SEGMENTS = os.environ.get("RETNET_TRITON_SCAN_SEGMENTS", "auto")
CARRY_BLOCK = 2048


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def scan_segments(state_elements: int, chunks: int, device) -> int:
    """How many segments the forward scan runs side by side (SCAN_SEGMENTS). `auto`: 1 unless the
    scan's programs at its usual 64 x 128 state tile (state_elements = B*H*DX*DY over the tile)
    would leave the GPU with fewer than two per SM; each segment keeps at least 4 chunks, at most 4
    segments."""
    if str(SCAN_SEGMENTS) != "auto":
        try:
            count = int(SCAN_SEGMENTS)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"RETNET_TRITON_SCAN_SEGMENTS={SCAN_SEGMENTS!r}: a count >= 1 or 'auto'")
        return count
    if device.type != "cuda" or INTERPRET:
        return 1
    programs = max(1, state_elements // (64 * 128))
    return max(1, min(4, chunks // 4, 2 * _sm_count(device.index or 0) // programs))


def launch_carry(batch_heads: int, args: dict):
    """The segments' carry pass (_states_carry_kernel) over every later chunk and the final state."""
    DXY, N, SEG = args["DX"] * args["DY"], args["N"], args["SEG"]
    grid = (triton.cdiv(DXY, CARRY_BLOCK), N - SEG + 1, batch_heads)
    opts = {} if INTERPRET else {"num_warps": 4, **COMPILE}
    _states_carry_kernel[grid](**args, BLOCK=CARRY_BLOCK, BZ=triton.next_power_of_2(args["DX"]), **opts)
