r"""Retention alone (one layer), forward and forward + backward, per backend and head dims.

    python -m retnet_train.bench.retention_kernels --dims 256x512,128x256 --heads 8 --seq-len 8192 \
        --backends compiled@256,triton@128,triton@256 --profile

Backends: `fla` (fla-core's chunk kernel, fixed chunk 64), `torch@C` (our chunkwise form with chunk
C, eager), `compiled@C` (the same under torch.compile) and `triton@C` (kernels/triton_retention.py,
states every C tokens), each with the score row sums the paper's normalization needs; `--docs N`
packs N documents per sequence (document resets).
Prints one JSON line per (head dims, backend): ms of the forward (with grad enabled, as in
training) and of forward + backward, effective TFLOP/s (the chunkwise form's matmul FLOPs at
that chunk), the activation memory the backward keeps and, with --profile, the device kernels of
one forward + backward in launch order (us each) and the top kernels by share; for `triton@C`
without --docs also `passes`: each pass's time, the bytes it must read and write and the bandwidth
that makes (bench/retention_traffic.py). Then one line
`{"autotuned": ...}`: per Triton kernel, the config picked for each key and every candidate's time
at the key tuned last. A variant that fails prints its error and the run goes on; a table of all
results comes last, also when the run is stopped by SIGTERM (e.g. from `timeout`).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time

import torch

from ..kernels import fla_available, retention_op
from ..model.retnet import decay_log_gammas
from .gpu_profile import top_kernels
from .presets import FLA_CHUNK, load_preset
from .retention_traffic import pass_table, triton_passes
from .throughput_args import count


class Stopped(BaseException):
    """SIGTERM: stop timing and print the table (not caught by a variant's `except Exception`)."""


def chunkwise_flops(B, T, H, K, V, C) -> float:
    """Forward matmul FLOPs of the chunkwise form: q k^T and scores v inside chunks, the chunk
    summaries k^T v and the state read q S; the backward is about twice this."""
    return 2.0 * B * H * T * (C * K + C * V + 2 * K * V)


KINDS = ("fla", "torch", "compiled", "triton")


def retention_fn(kind, C, lg, reset):
    """(q, k, v) -> (o, row sums) for one backend spec."""
    if kind not in KINDS:
        raise ValueError(f"unknown backend {kind!r}: one of {', '.join(KINDS)}")
    if kind == "triton":  # the kernels themselves: the dispatcher refuses key dims not yet checked on GPU
        from ..kernels.triton_retention import triton_retention

        return lambda q, k, v: triton_retention(q, k, v, lg, C, None, True, reset)[:2]
    backend = "fla" if kind == "fla" else "torch"

    def fn(q, k, v):  # training's call: the final state is not used
        o, s, _ = retention_op(backend, q, k, v, lg, "chunkwise", C, reset, None, True, keep_state=False)
        return o, s

    return torch.compile(fn) if kind == "compiled" else fn


def triton_pass_table(B, T, H, K, V, C, kernels_us):
    """The `triton` backend's passes with their times, bytes and bandwidth, or the reason they do not
    line up with the profiled kernels."""
    from ..kernels.triton_retention_launch import scan_segments

    try:  # the timings stand without it
        segments = scan_segments(B * H * K * V, -(-T // C), torch.device("cuda", torch.cuda.current_device()))
        return pass_table(triton_passes(B, T, H, K, V, C, segments), kernels_us)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def kernel_sequence(prof, steps: int) -> list:
    """[name, us] of each device kernel of one step, in launch order (the profile holds `steps`
    identical steps)."""
    events = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    events.sort(key=lambda e: e.time_range.start)
    per_step = events[: len(events) // steps]
    return [[e.name[:60], round(e.time_range.elapsed_us(), 1)] for e in per_step]


def time_variant(fn, q, k, v, steps, profile):
    grad = torch.randn_like(v)

    def fwd():
        return fn(q, k, v)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None  # no accumulation kernels into the leaves' grads
        o, _ = fn(q, k, v)
        o.backward(grad)

    for _ in range(3):  # warm-up: autotuning, compilation
        fwd_bwd()
        fwd()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    o, s = fwd()
    kept = torch.cuda.memory_allocated() - base
    del o, s
    out = {"kept_gib": round(kept / 2**30, 3)}
    for name, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        out[f"ms_{name}"] = round(start.elapsed_time(end) / steps, 4)
    if profile:
        try:  # the timings stand without a profile
            out.update(profile_kernels(fwd_bwd))
        except Exception as e:
            out["profile_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def profile_kernels(fwd_bwd, steps=3) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fwd_bwd()
        torch.cuda.synchronize()
    kernels = kernel_sequence(prof, steps)
    # Device time of one forward + backward without the host's launch gaps (which dominate the wall
    # time of one layer at B 1, where each kernel runs ~0.2 ms).
    gpu_ms = sum(us for _, us in kernels) / 1000
    return {
        "gpu_ms_fwd_bwd": round(gpu_ms, 4),
        "top_kernels": top_kernels(prof, 12),
        "kernels_fwd_bwd_us": kernels[:40],
    }


def autotuned_configs(kernels=None) -> dict:
    """Per Triton kernel: the config the autotuner picked for each key so far and, for the key it tuned
    last, every candidate's time (us, median), the fastest first."""
    if kernels is None:
        try:
            from ..kernels import triton_retention_launch as kernels
        except Exception:
            return {}
    report = {}
    for name, (_, tuned, _, _) in kernels.KERNELS.items():
        picked = {str(key): str(cfg) for key, cfg in getattr(tuned, "cache", {}).items()}
        timings = sorted(
            (t[0] if isinstance(t, list) else t, str(c)) for c, t in getattr(tuned, "configs_timings", {}).items()
        )
        us = [[round(ms * 1000, 1) if math.isfinite(ms) else None, cfg] for ms, cfg in timings]  # None: failed
        report[name] = {"picked": picked, "last_key_us": us}
    return report


def print_table(rows):
    print(f"\n{'dims':<10}{'backend':<18}{'fwd ms':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'kept GiB':>10}  note")
    for r in rows:
        cells = [
            f"{r[key]:>{w}.{p}f}" if key in r else f"{'-':>{w}}"
            for key, w, p in (("ms_fwd", 9, 3), ("ms_fwd_bwd", 12, 3), ("tflops", 9, 1), ("kept_gib", 10, 3))
        ]
        print(f"{r['dims']:<10}{r['backend']:<18}{''.join(cells)}  {r.get('error', '')[:70]}", flush=True)


def parse_dims(text):
    """--dims: KxV,... as [(K, V), ...], each >= 1."""
    try:
        dims = [tuple(int(x) for x in d.split("x")) for d in text.split(",")]
    except ValueError:
        dims = []
    if not dims or any(len(d) != 2 or min(d) < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"not a comma list of KxV head dims, e.g. 256x512,128x256: {text!r}")
    return dims


def parse_backends(text):
    """--backends: KIND@C,... as [(spec, kind, chunk)]; fla runs its own chunk of 64 (FLA_CHUNK)."""
    backends = []
    for spec in text.split(","):
        kind, at, chunk = spec.partition("@")
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"{spec!r}: unknown backend {kind!r}, one of {', '.join(KINDS)}")
        if at and not (chunk.isdigit() and int(chunk) >= 1):
            raise argparse.ArgumentTypeError(f"{spec!r}: the chunk after @ is not an integer >= 1")
        if kind == "fla" and at and int(chunk) != FLA_CHUNK:
            raise argparse.ArgumentTypeError(f"{spec!r}: fla runs chunk {FLA_CHUNK} whatever is asked; write fla")
        backends.append((spec, kind, int(chunk) if at else 64))
    return backends


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.bench.retention_kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dims", type=parse_dims, default="256x512,128x256", help="comma list of KxV head dims")
    p.add_argument("--heads", type=count(1), default=8)
    p.add_argument("--preset", default=None, help="take heads and head dims from configs/model/<preset>.yaml")
    p.add_argument("--seq-len", type=count(1), default=8192)
    p.add_argument("--micro-batch", type=count(1), default=1)
    p.add_argument(
        "--backends",
        type=parse_backends,
        default="compiled@256,triton@128,triton@256",
        help=f"KIND@C,... (C: the chunk, 64 if left out); KIND: {', '.join(KINDS)}",
    )
    p.add_argument("--docs", type=count(1), default=1, help="documents per sequence (> 1: document resets)")
    p.add_argument("--steps", type=count(1), default=20)
    p.add_argument("--profile", action="store_true", help="add each variant's device kernels")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("retention_kernels needs a GPU")
    H, dims = args.heads, args.dims
    if args.preset:
        cfg = load_preset(args.preset)
        H, dims = cfg.n_heads, [(cfg.key_head_dim, cfg.value_head_dim)]

    def stop(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)
    rows = []
    try:
        for K, V in dims:
            for backend in args.backends:
                rows.append(run_variant(backend, args, H, K, V))
    except Stopped:
        print(json.dumps({"stopped": "SIGTERM", "done": len(rows)}), flush=True)
    print(json.dumps({"autotuned": autotuned_configs()}), flush=True)
    print_table(rows)


def run_variant(backend, args, H, K, V):
    B, T = args.micro_batch, args.seq_len
    spec, kind, C = backend
    row = {"dims": f"{K}x{V}", "backend": spec, "B": B, "T": T, "H": H, "K": K, "V": V, "docs": args.docs}
    t0 = time.time()
    try:
        if kind == "fla" and not fla_available():
            raise RuntimeError("fla-core is not installed")
        torch.manual_seed(0)
        make = lambda *shape, s=1.0: (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * s).requires_grad_()  # noqa: E731
        q, k, v = make(B, T, H, K), make(B, T, H, K, s=K**-0.5), make(B, T, H, V)
        lg = decay_log_gammas(H).cuda()
        reset = None
        if args.docs > 1:
            reset = torch.zeros(B, T, dtype=torch.bool, device="cuda")
            reset[:, :: -(-T // args.docs)] = True
        row.update(time_variant(retention_fn(kind, C, lg, reset), q, k, v, args.steps, args.profile))
        if kind == "triton" and reset is None and "kernels_fwd_bwd_us" in row:
            row["passes"] = triton_pass_table(B, T, H, K, V, C, row["kernels_fwd_bwd_us"])
        row["tflops"] = round(3 * chunkwise_flops(B, T, H, K, V, C) / row["ms_fwd_bwd"] / 1e9, 1)
    except Exception as e:  # one failing variant (compile error, OOM, missing package) must not end the run
        row["error"] = f"{type(e).__name__}: {e}"[:400]
    row["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(row), flush=True)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return row


if __name__ == "__main__":
    main()
