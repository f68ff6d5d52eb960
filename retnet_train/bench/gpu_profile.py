"""A torch.profiler profile of training steps summarized: GPU time by kernel category and the top kernels."""

from __future__ import annotations

CATEGORIES = [  # first match wins, by CUDA kernel name
    # before retention: the fused Adam's multi_tensor_apply_kernel would match our "_apply_kernel"
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    # fla's kernels, and ours (kernels/triton_retention_{states,scores,apply}.py)
    (
        "retention",
        (
            "chunk",
            "simple_gla",
            "recurrent",
            "retention",
            "_states_kernel",
            "_states_pair_kernel",
            "_scores_kernel",
            "_apply_kernel",
        ),
    ),
    # before gemm: cuDNN's SDPA kernels carry "sm90" in their names too
    ("flash_attention", ("flash", "fmha", "sdpa", "attention")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "sm90")),
    ("cross_entropy", ("cross_entropy", "softmax", "logsumexp", "nll")),
    ("norm", ("norm",)),
]
# name prefixes of the rows that are not kernels: host ops and ranges (their device time counts their
# kernels, which have rows of their own) and runtime calls
NOT_KERNELS = ("aten::", "ProfilerStep", "##", "cuda", "Optimizer.")


def kernel_rows(prof) -> list:
    """(device us, calls, name) of each kernel, memcpy and memset in a profile's key_averages."""
    rows = [(_own_device_us(e), e.count, e.key) for e in prof.key_averages()]
    return [r for r in rows if r[0] and not r[2].startswith(NOT_KERNELS)]


def _own_device_us(row) -> float:
    own = getattr(row, "self_device_time_total", None)
    return (getattr(row, "device_time_total", 0) if own is None else own) or 0


def time_breakdown(prof) -> dict:
    totals = {}
    for us, _, key in kernel_rows(prof):
        name = key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "elementwise_other")
        totals[cat] = totals.get(cat, 0.0) + us
    all_us = sum(totals.values()) or 1.0
    return {k: round(v / all_us, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def top_kernels(prof, n: int = 15) -> list:
    """The n CUDA kernels with the most device time: [share, calls, name cut to 120 characters]."""
    rows = kernel_rows(prof)
    total = sum(r[0] for r in rows) or 1.0
    return [[round(us / total, 3), calls, name[:120]] for us, calls, name in sorted(rows, reverse=True)[:n]]


DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_EVENTS = ("cuda_runtime", "cuda_driver")  # the host's launch calls, linked to their kernels


def device_intervals(trace: dict) -> list:
    """(start us, end us, name) of every kernel, memcpy and memset in a Chrome trace, by start."""
    rows = [
        (e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?"))
        for e in trace.get("traceEvents", [])
        if e.get("cat") in DEVICE_EVENTS and "ts" in e
    ]
    return sorted(rows)


def device_ms_by_launcher(trace: dict, steps: int) -> dict:
    """GPU ms per step of the work each host thread launched (traces that record the runtime calls):
    "backward" is the autograd engine's thread, "main" the one that runs the forward and the
    optimizer step. Set against a phase's wall time it says whether the phase kept the GPU busy."""
    events = trace.get("traceEvents", [])
    launcher = {e["args"]["correlation"]: e["tid"] for e in events if e.get("cat") in RUNTIME_EVENTS}
    backward = {e["tid"] for e in events if e.get("cat") == "cpu_op" and e["name"].startswith("autograd::engine")}
    ms = {}
    for e in events:
        tid = launcher.get(e.get("args", {}).get("correlation")) if e.get("cat") in DEVICE_EVENTS else None
        if tid is not None:
            name = "backward" if tid in backward else "main"
            ms[name] = ms.get(name, 0.0) + e.get("dur", 0) / 1e3 / max(steps, 1)
    return {name: round(v, 2) for name, v in sorted(ms.items())}


# host ops whose time per call says how long the host takes to launch a block's work
HOST_OPS = (
    "CompiledFunction",  # a compiled block's forward graph
    "CompiledFunctionBackward",
    "retnet_train::triton_retention",  # our retention kernels' custom ops, inside those graphs
    "retnet_train::triton_retention_backward",
)


def host_ms_per_call(trace: dict, steps: int, names=HOST_OPS) -> dict:
    """{op: [host ms per call, calls per step]} of the host ops named (traces that record them): set
    against the GPU time of the work they launch, whether the host keeps ahead."""
    spent = {}
    for e in trace.get("traceEvents", []):
        if e.get("cat") == "cpu_op" and e.get("name") in names:
            us, calls = spent.get(e["name"], (0.0, 0))
            spent[e["name"]] = (us + e.get("dur", 0), calls + 1)
    return {n: [round(us / calls / 1e3, 3), round(calls / max(steps, 1), 1)] for n, (us, calls) in spent.items()}


def idle_time(trace: dict, steps: int, top: int = 8) -> dict:
    """When the GPU ran nothing between the profile's first and last kernel: the busy share, the idle
    ms per step and the longest gaps [ms, kernel before, kernel after] (what the host was late for)."""
    rows = device_intervals(trace)
    if not rows:
        return {}
    busy, gaps, end, last = 0.0, [], rows[0][0], rows[0][2]
    for start, stop, name in rows:
        if start > end:
            gaps.append((start - end, last, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, last = stop, name
    span = end - rows[0][0]
    idle = span - busy
    longest = sorted(gaps, reverse=True)[:top]
    return {
        "gpu_busy": round(busy / span, 4) if span else 1.0,
        "idle_ms_per_step": round(idle / 1e3 / max(steps, 1), 2),
        "gaps_over_100us": sum(g[0] > 100 for g in gaps),
        "longest_gaps": [[round(us / 1e3, 3), before[:60], after[:60]] for us, before, after in longest],
    }


def host_side(trace: dict, steps: int) -> dict:
    """From a trace that recorded the host's ops: the GPU ms per step each host thread launched and the
    host ms per call of the compiled graphs and our ops ({} entries without host ops)."""
    return {
        "device_ms_per_step_launched_by": device_ms_by_launcher(trace, steps),
        "host_ms_per_call": host_ms_per_call(trace, steps),
    }
