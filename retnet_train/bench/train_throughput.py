r"""Training throughput of RetNet, the Transformer baseline and (if installed) fla's RetNet,
measured in one process on one GPU with the real DeepSpeed training step.

    python -m retnet_train.bench.train_throughput --preset 1.3b --seq-len 2048,8192,32768 --micro-batch 2 \
        --grad-accum 4 --plot sweep.png

Prints one JSON line per model and sequence length: tokens/s, peak GiB, MFU (6N and model FLOPs),
final loss; --plot draws tokens/s and peak memory against sequence length, one line per model.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..components.distributed import init_distributed
from ..components.process_exit import end_before_teardown, exit_with
from .sweep import batch_for_length, plot_sweep, sweep_title
from .throughput_args import add_run_args, add_sweep_args, add_training_args, model_specs
from .throughput_measure import measure_or_oom


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p)
    add_training_args(p)
    add_run_args(p)
    args = p.parse_args(argv)
    if args.activation_memory_budget != 1.0 and not args.compile:
        p.error("--activation-memory-budget needs --compile")
    if args.compile_mode is not None and not args.compile:
        p.error("--compile-mode needs --compile")
    if args.profile_trace is not None and not args.profile:
        p.error("--profile-trace needs --profile")  # the trace is the profile's: without it nothing is recorded
    return args


def bench_device(cpu: bool) -> torch.device:
    """GPU 0 (or the CPU with --cpu), with a one-rank process group for DeepSpeed."""
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("train_throughput needs a GPU (--cpu: check the script on CPU)")
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    return device


def args_at_length(args, seq_len: int, base_accum: int) -> argparse.Namespace:
    """args for one point of the sweep: its length, and the batch that keeps the first length's tokens."""
    mb, steps_accum = batch_for_length(seq_len, args.seq_len[0], args.micro_batch, base_accum)
    return argparse.Namespace(**{**vars(args), "seq_len": seq_len, "micro_batch": mb, "grad_accum": steps_accum})


def fla_skip(args):
    """Why fla's model cannot run with these arguments, or None."""
    if args.activation_checkpointing == "selective":
        return "fla's model has no selective activation checkpointing"
    try:
        import fla.models  # noqa: F401
    except ImportError:
        return "flash-linear-attention is not installed"
    return None


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def run_sweep(args, device) -> list:
    """Every model at every base accumulation and length, each row printed as it is measured."""
    results = []
    for name, overrides, cfg, build in model_specs(args.models, args.preset, args.backend):
        skip = fla_skip(args) if name == "fla" else None
        if skip:
            results.append(emit({"model": name, "skipped": skip}))
            continue
        for accum in args.grad_accum:
            for seq_len in args.seq_len:
                result = measure_or_oom(name, build, cfg, args_at_length(args, seq_len, accum), device)
                tokens = args.micro_batch * accum * args.seq_len[0]  # the sweep's tokens per step: its plot line
                results.append(emit({**result, "overrides": overrides, "sweep_tokens_per_step": tokens}))
    return results


def main(argv=None):
    args = parse_args(argv)
    device = bench_device(args.cpu)
    results = run_sweep(args, device)
    if args.plot:
        plot_sweep(results, args.plot, sweep_title(results))
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    end_before_teardown()  # torch's exit handlers, registered at its import above, are skipped: none matters here
    main()
    exit_with(0)
