"""Retention alone, forward + backward, per backend at a preset's shapes (one layer).

    python -m retnet_train.bench.retention_kernels --preset 1.3b --seq-len 8192 --micro-batch 1

Backends: `fla` (fla-core's chunk kernel, fixed chunk 64), `torch@C` (our chunkwise form with
chunk C, eager or torch.compile'd: `compiled@C`) and `triton@C` (our Triton kernels, states every
C), each with the score row sums the paper's normalization needs.
Prints one JSON line each: ms per forward+backward, effective TFLOP/s (the chunkwise form's
matmul FLOPs at that chunk), and the activation memory the backward keeps.
"""
from __future__ import annotations

import argparse
import json

import torch

from ..kernels import fla_available, retention_op
from ..model.retnet import decay_log_gammas
from .train_throughput import load_preset, top_kernels


def chunkwise_flops(B, T, H, K, V, C) -> float:
    """Forward matmul FLOPs of the chunkwise form: q k^T and scores v inside chunks, the chunk
    summaries k^T v and the state read q S; the backward is about twice this."""
    return 2.0 * B * H * T * (C * K + C * V + 2 * K * V)


def time_backend(name, fn, q, k, v, steps, profile=False):
    grad = torch.randn_like(v)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None  # no accumulation kernels into the leaves' grads
        o, s = fn(q, k, v)
        o.backward(grad)

    for _ in range(3):  # warm-up: autotuning, compilation
        fwd_bwd()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    o, s = fn(q, k, v)
    kept = torch.cuda.memory_allocated() - base
    o.backward(grad)
    del o, s
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fwd_bwd()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    top = None
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd_bwd()
            torch.cuda.synchronize()
        top = top_kernels(prof, 12)
    return ms, kept, top


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--backends", default="fla,torch@64,torch@128,torch@256,compiled@128,compiled@256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="add each backend's top CUDA kernels")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("retention_kernels needs a GPU")
    cfg = load_preset(args.preset)
    B, T, H, K, V = args.micro_batch, args.seq_len, cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim
    torch.manual_seed(0)
    make = lambda *shape, s=1.0: (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * s).requires_grad_()  # noqa: E731
    q, k, v = make(B, T, H, K), make(B, T, H, K, s=K ** -0.5), make(B, T, H, V)
    lg = decay_log_gammas(H).cuda()
    for spec in args.backends.split(","):
        kind, _, chunk = spec.partition("@")
        C = int(chunk or 64)
        if kind == "fla" and not fla_available():
            print(json.dumps({"backend": spec, "skipped": "fla-core is not installed"}), flush=True)
            continue
        backend = kind if kind in ("fla", "triton") else "torch"

        def fn(q, k, v, backend=backend, C=C):
            o, s, _ = retention_op(backend, q, k, v, lg, "chunkwise", C, None, None, True)
            return o, s
        if kind == "compiled":
            fn = torch.compile(fn)
        try:
            ms, kept, top = time_backend(spec, fn, q, k, v, args.steps, args.profile)
        except torch.cuda.OutOfMemoryError as e:
            print(json.dumps({"backend": spec, "oom": str(e)[:160]}), flush=True)
            continue
        flops = 3 * chunkwise_flops(B, T, H, K, V, C)
        print(json.dumps({"backend": spec, "preset": args.preset, "B": B, "T": T, "H": H, "K": K, "V": V,
                          "ms_fwd_bwd": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                          "kept_gib": round(kept / 2 ** 30, 3), **({"top_kernels": top} if top else {})}), flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
