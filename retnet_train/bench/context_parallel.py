r"""Longest trainable sequence with and without context parallelism (parallel/context.py).

    torchrun --standalone --nproc_per_node=2 -m retnet_train.bench.context_parallel \
        --preset 1.3b --seq-lens 8192,16384,32768,65536,131072 --context-parallel 2 \
        --zero-stage 1 --activation-checkpointing full

For each sequence length, in ascending order: a few real DeepSpeed train steps (bf16 on GPU, fp32 on
CPU) on random tokens, one JSON line (fits, tokens/s, peak GiB per rank, the last step's loss over
the whole sequences, all ranks' shares summed). It stops at the first length
that does not fit (CUDA out of memory on any rank) and prints the longest that fit. The model and
engine are built once; every length reuses them, so the peaks differ only by activations.
P consecutive ranks share a sequence (context parallel); data parallelism runs over world / P.

If only some ranks run out of memory, the others can wait in a collective: --timeout-s turns that
into an error (the lines printed so far stand; the length that hung did not fit).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time

import torch
import torch.distributed as dist

from ..components.distributed import init_distributed
from ..components.metrics import peak_memory_gib
from ..components.process_exit import end_before_teardown, exit_with
from ..model import build_model
from ..parallel import build_context_parallel, check_layout, parallelize
from .engine import make_engine
from .presets import load_preset
from .throughput_args import count, int_list
from .throughput_measure import reset_peak


def init(args) -> torch.device:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    init_distributed(device, datetime.timedelta(seconds=args.timeout_s))
    return device


def make_batch(args, vocab, T, dp_rank, cp, device):
    """Random tokens, the same on the ranks of a context-parallel group; each keeps its slice."""
    g = torch.Generator().manual_seed(1000 + dp_rank)
    ids = torch.randint(0, vocab, (args.micro_batch, T + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    if args.doc_len:
        batch["doc_starts"] = torch.rand(args.micro_batch, T, generator=g) < 1.0 / args.doc_len
    batch = {k: v.contiguous().to(device) for k, v in batch.items()}
    return cp.shard_batch(batch) if cp is not None else batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(engine, args, vocab, T, dp_rank, cp, device):
    batch = make_batch(args, vocab, T, dp_rank, cp, device)
    loss = None

    def step():
        nonlocal loss
        loss = engine(**batch, return_logits=False).loss
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):  # Triton autotuning for the new shapes
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return time.perf_counter() - start, float(loss)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.bench.context_parallel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="1.3b", help="configs/model/<preset>.yaml")
    p.add_argument(
        "--seq-lens",
        type=int_list,
        default="8192,16384,32768,65536,131072",
        help="comma list, tried in ascending order",
    )
    p.add_argument("--context-parallel", type=count(1), default=1, help="ranks per sequence (P); 1: off")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "selective", "full"])
    p.add_argument("--micro-batch", type=count(1), default=1)
    p.add_argument("--steps", type=count(1), default=3, help="timed steps per length")
    p.add_argument("--warmup", type=count(0), default=1, help="untimed steps per length first")
    p.add_argument("--doc-len", type=count(0), default=0, help="mean document length for doc_starts (0: none)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "fla"], help="retention backend")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="model preset override, e.g. n_layers=2"
    )
    p.add_argument("--cpu", action="store_true", help="run on CPU (gloo, fp32) even where a GPU is visible")
    p.add_argument("--timeout-s", type=int, default=600, help="collective timeout (a rank stuck after another's OOM)")
    args = p.parse_args(argv)
    try:  # before torch.distributed starts: every rank would raise the same traceback
        load_preset(args.preset, **preset_overrides(args.set))
    except ValueError as exc:
        p.error(f"--set: {exc}")
    return args


def preset_overrides(pairs) -> dict:
    """--set KEY=VALUE pairs, each value read as YAML."""
    import yaml

    bad = next((pair for pair in pairs if "=" not in pair), None)
    if bad is not None:
        raise ValueError(f"{bad!r} is not KEY=VALUE (a model preset override)")
    return {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in pairs)}


def build_engine(args, cfg, device, cp):
    """The model (seed 0) with activation checkpointing and context parallelism, and its DeepSpeed engine."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    parallelize(model, activation_checkpointing=args.activation_checkpointing, context_parallel=cp)
    bf16 = device.type == "cuda"
    engine = make_engine(model.to(torch.bfloat16) if bf16 else model, args.micro_batch, args.zero_stage, bf16=bf16)
    return model, engine


def run_fields(args, model, world, device) -> dict:
    """What every JSON line repeats."""
    return {
        "preset": args.preset,
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),  # ZeRO-3: p is a shard
        "world": world,
        "context_parallel": args.context_parallel,
        "zero_stage": args.zero_stage,
        "activation_checkpointing": args.activation_checkpointing,
        "micro_batch": args.micro_batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16" if device.type == "cuda" else "fp32",
    }


def try_length(engine, args, vocab, T, dp_rank, cp, device, rank):
    """(seconds, last loss, None) for length T, or (nan, nan, the error's first line) where it ran out of memory."""
    if device.type == "cuda":
        gc.collect()  # the previous length's tensors, before the cache is emptied
    reset_peak(device)
    try:
        elapsed, loss = measure(engine, args, vocab, T, dp_rank, cp, device)
    except torch.cuda.OutOfMemoryError as e:
        error = str(e).splitlines()[0][:200]
        print(json.dumps({"rank": rank, "seq_len": T, "oom": error}), flush=True)
        return float("nan"), float("nan"), error
    return elapsed, loss, None


def gather_verdicts(error, loss, device, world, control) -> list:
    """Every rank's [fits (1 or 0), peak GiB, its share of the loss], over the CPU group."""
    mine = torch.tensor([0.0 if error else 1.0, peak_memory_gib(device), loss], dtype=torch.float64)
    verdicts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(verdicts, mine, group=control)
    return verdicts


def full_loss(verdicts) -> float:
    """The loss of the whole batch from the ranks' shares: each rank's is P x its token losses' sum over
    its group's tokens (Segment.scale_loss), so their sum over the world / W is the mean of the
    data-parallel groups' losses (as the trainer reports it), a one-rank run's loss where world = P."""
    return sum(v[2].item() for v in verdicts) / len(verdicts)


def length_line(base, args, T, dp_world, fits, verdicts, elapsed) -> dict:
    tokens = args.steps * args.micro_batch * T * dp_world  # every data-parallel group trains its sequences
    return {
        **base,
        "seq_len": T,
        "tokens_per_rank": T // args.context_parallel,
        "fits": fits,
        "tokens_per_s": round(tokens / elapsed, 1) if fits else None,
        "step_s": round(elapsed / args.steps, 3) if fits else None,
        "peak_gib_per_rank": [round(v[1].item(), 2) for v in verdicts],
        "loss": round(full_loss(verdicts), 4) if fits else None,
    }


def main(argv=None):
    args = parse_args(argv)
    seq_lens = sorted(args.seq_lens)
    overrides = preset_overrides(args.set)
    device = init(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    P = args.context_parallel
    cp, dp_rank, dp_world = build_context_parallel(P, rank, world, seq_lens[0])
    control = dist.new_group(backend="gloo")  # CPU verdicts: not queued behind a failed GPU collective

    cfg = load_preset(args.preset, retention_backend=args.backend, **overrides)
    model, engine = build_engine(args, cfg, device, cp)
    base = run_fields(args, model, world, device)
    longest = None
    for T in seq_lens:
        check_layout(P, world, T)
        elapsed, loss, error = try_length(engine, args, cfg.vocab_size, T, dp_rank, cp, device, rank)
        verdicts = gather_verdicts(error, loss, device, world, control)
        fits = all(v[0].item() > 0 for v in verdicts)
        if rank == 0:
            print(json.dumps(length_line(base, args, T, dp_world, fits, verdicts, elapsed)), flush=True)
        if not fits:
            break  # longer ones need more; after an OOM the engine's state is not trustworthy either
        longest = T
    if rank == 0:
        print(json.dumps({**base, "longest_fitting_seq_len": longest, "tried": seq_lens}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    end_before_teardown()  # torch's exit handlers, registered at its import above, are skipped: none matters here
    main()
    exit_with(0)
