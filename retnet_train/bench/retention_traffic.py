"""The bytes each pass of the `triton` retention backend reads and writes in one forward + backward
(with the normalization's row sums, no document resets), paired with the profiled kernel times: the
memory bandwidth each pass reaches, against the GPU's, says whether bytes bound it.

Counts are compulsory traffic: every tensor a pass reads is read once and every tensor it writes is
written once (tiles that reread an input add to this; caches may save some of it). Names of the passes
follow kernels/triton_retention.py (_forward, _backward).
"""

from __future__ import annotations

import math

from ..kernels.scan_split import scan_split

# Triton kernel name (as the profiler lists it) of each pass kind
KERNEL = {
    "states": "_states_kernel",
    "carry": "_states_carry_kernel",
    "scores": "_scores_kernel",
    "apply": "_apply_kernel",
    "states_pair": "_states_pair_kernel",
}


def triton_passes(B, T, H, K, V, C, segments=1, elem=2) -> list[tuple[str, str, int]]:
    """[(pass, kernel kind, bytes)] in launch order; `segments`: the forward scan's (scan_segments),
    `elem`: bytes per element of q, k, v (the states S and dG and the scores take the same); the scan's
    final states and row-sum states are fp32."""
    N = math.ceil(T / C)
    seg, P = scan_split(N, segments)  # chunks per segment, segments
    qk = B * T * H * K * elem  # q, k, dq, dk
    vo = B * T * H * V * elem  # v, o, dO, dv
    states = B * H * N * K * V * elem  # S or dG, every chunk
    scores = B * H * T * C * elem  # A or dA
    fp32_state = B * H * K * V * 4
    z = B * H * N * K * 4
    passes = [("forward: states scan", "states", qk + vo + states + z + P * fp32_state + B * H * P * K * 4)]
    if P > 1:  # later segments' states read and written, each segment's final state read, the last one updated
        later = B * H * (N - seg) * K * V * elem
        passes.append(("forward: carry between segments", "carry", 2 * later + P * fp32_state + 2 * fp32_state))
    row_sums = B * T * H * (C // 16) * 4
    passes += [
        ("forward: scores q k (row sums)", "scores", 2 * qk + scores + row_sums + z),
        ("forward: output o", "apply", qk + vo + states + scores + vo),
        ("backward: both state scans", "states_pair", 2 * qk + 2 * vo + 2 * states + 2 * fp32_state),
        ("backward: scores dO v", "scores", 2 * vo + scores),
        ("backward: dq", "apply", vo + qk + states + scores + qk),
        ("backward: dk", "apply", vo + qk + states + scores + qk),
        ("backward: scores q k", "scores", 2 * qk + scores),
        ("backward: dv", "apply", qk + vo + states + scores + vo),
    ]
    return passes


def pass_table(passes, kernels_us) -> list[dict]:
    """Each pass with its profiled time: the retention kernels of `kernels_us` ([name, us] of one forward
    + backward in launch order; other kernels skipped) taken one per pass. ValueError when they do not
    line up with the passes (another backend, or a kernel split differently)."""
    names = set(KERNEL.values())
    timed = [(name, us) for name, us in kernels_us if name in names]
    expected = [KERNEL[kind] for _, kind, _ in passes]
    if [name for name, _ in timed] != expected:
        raise ValueError(f"profiled retention kernels {[n for n, _ in timed]} are not the passes {expected}")
    return [
        {"pass": label, "us": us, "mb": round(nbytes / 1e6, 1), "tb_per_s": round(nbytes / us / 1e6, 2)}
        for (label, _, nbytes), (_, us) in zip(passes, timed)
    ]
