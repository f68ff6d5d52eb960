r"""Training throughput of RetNet, the Transformer baseline and (if installed) fla's RetNet,
measured in one process on one GPU with the real DeepSpeed training step.

    python -m retnet_train.bench.train_throughput --preset 1.3b --seq-len 2048,8192,32768 --micro-batch 2 \
        --grad-accum 4 --plot sweep.png

Prints one JSON line per model and sequence length: tokens/s, peak GiB, MFU (6N and model FLOPs),
final loss; --plot draws tokens/s and peak memory against sequence length, one line per model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from ..components.distributed import init_distributed
from ..components.process_exit import end_before_teardown, exit_with
from .sweep import batch_for_length, image_path_or_error, plot_sweep, sweep_title
from .throughput_args import add_run_args, add_sweep_args, add_training_args, model_specs
from .throughput_measure import measure_or_oom


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.bench.train_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sweep_args(p)
    add_training_args(p)
    add_run_args(p)
    args = p.parse_args(argv)
    if any(b != 1.0 for b in args.activation_memory_budget) and not args.compile:
        p.error("--activation-memory-budget needs --compile")
    if args.plot and len(args.activation_memory_budget) * len(args.activation_checkpointing) > 1:
        p.error(
            "--plot draws tokens/s against sequence length at one budget and one checkpointing mode; "
            "draw several with python -m retnet_train.bench.tradeoff on the printed rows"
        )
    if args.plot:
        image_path_or_error(p, args.plot)
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


def point_args(args, seq_len: int, base_accum: int, budget: float, mode: str) -> argparse.Namespace:
    """args for one point of the sweep: its length, the batch that keeps the first length's tokens,
    its activation memory budget and checkpointing mode."""
    mb, steps_accum = batch_for_length(seq_len, args.seq_len[0], args.micro_batch, base_accum)
    point = {"seq_len": seq_len, "micro_batch": mb, "grad_accum": steps_accum}
    return argparse.Namespace(
        **{**vars(args), **point, "activation_memory_budget": budget, "activation_checkpointing": mode}
    )


def fla_skip(mode: str):
    """Why fla's model cannot run with this checkpointing mode, or None."""
    if mode == "selective":
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
    """Every model at every budget, checkpointing mode, base accumulation and length, each row printed as
    it is measured."""
    results = []
    for name, overrides, cfg, build in model_specs(args.models, args.preset, args.backend):
        # fla's model runs uncompiled: the budget does not apply to it, one budget's rows are all of them
        budgets = args.activation_memory_budget[:1] if name == "fla" else args.activation_memory_budget
        for budget, mode in itertools.product(budgets, args.activation_checkpointing):
            skip = fla_skip(mode) if name == "fla" else None
            if skip:
                results.append(emit({"model": name, "activation_checkpointing": mode, "skipped": skip}))
                continue
            for accum, seq_len in itertools.product(args.grad_accum, args.seq_len):
                point = point_args(args, seq_len, accum, budget, mode)
                result = measure_or_oom(name, build, cfg, point, device)
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
